#!/usr/bin/env python
"""
What a distillation step costs on DeepForest (issue 16's target: at most the student's training
step plus one teacher forward). Times, on the same real training batches:

- the undistilled student's training step (forward + backward): RetinaNet MNV2-FPN;
- one full forward of the teacher (Faster R-CNN MNV2-FPN, eval mode, no_grad);
- the distiller's training step, per method config (FGFI, DeFeat, RM+PFI);

and reports each distiller step as a ratio to (student step + teacher forward).

    python tools/distill_cost_benchmark.py --json benchmarks/distill_cost_cpu.json

Fair by construction: all models run interleaved in one process, in an order rotated each
repeat, each time the median over --repeat x --batches steps. The teacher's weights are the
trained checkpoint when it exists (configs/DeepForest/distill/), else its random initialisation
(the step's cost does not depend on them: the distiller runs the teacher's backbone, and its RPN
head for RM+PFI, never its proposals or RoI head).
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

from benchmark import random_teacher_if_absent  # noqa: E402

CONFIGS = os.path.join(REPO, "configs", "DeepForest", "distill")
STUDENT = "retinanet_MNV2_FPN_student.yaml"
METHODS = {
    "fgfi": "retinanet_fgfi_from_frcnn.yaml",
    "defeat": "retinanet_defeat_from_frcnn.yaml",
    "rm_pfi": "retinanet_rm_pfi_from_frcnn.yaml",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.strip().splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--batches", type=int, default=3, help="training batches timed per repeat")
    parser.add_argument("--repeat", type=int, default=3, help="rotations of the model order")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--json", help="also write the results here (relative to the repository)")
    return parser.parse_args(argv)


def load_cfg(name):
    from mimicdet import get_mimicdet_cfg

    cfg = get_mimicdet_cfg(os.path.join(CONFIGS, name))
    cfg.MODEL.DEVICE = "cpu"
    random_teacher_if_absent(cfg)
    return cfg


def training_batches(cfg, n):
    from detectron2.engine import DefaultTrainer

    loader = iter(DefaultTrainer.build_train_loader(cfg))
    return [next(loader) for _ in range(n)]


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(args):
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    student_cfg = load_cfg(STUDENT)
    batches = training_batches(student_cfg, args.batches)
    models = {"student": build_model(student_cfg).train()}
    for method, name in METHODS.items():
        models[method] = build_model(load_cfg(name)).train()
    teacher = models["fgfi"].teacher.model  # the same config and checkpoint for every method

    def train_step(model):
        def step():
            with EventStorage(10**6):  # past any warm-up
                losses = model(batches[i])
            sum(losses.values()).backward()
            model.zero_grad(set_to_none=True)

        return step

    def teacher_forward():
        with torch.no_grad():
            teacher([{"image": x["image"]} for x in batches[i]])

    steps = {name: train_step(model) for name, model in models.items()}
    steps["teacher_forward"] = teacher_forward
    order = list(steps)
    times = {name: [] for name in order}
    for i in range(len(batches)):  # one untimed pass: allocator and oneDNN warm-up
        for name in order:
            steps[name]()
    for r in range(args.repeat):
        rotated = order[r % len(order) :] + order[: r % len(order)]
        for i in range(len(batches)):
            for name in rotated:
                times[name].append(timed(steps[name]))
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    budget = ms["student"] + ms["teacher_forward"]
    return {
        "command": "python tools/distill_cost_benchmark.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "threads": args.threads,
        "images_per_step": len(batches[0]),
        "samples_per_model": len(times["student"]),
        "teacher_trained": bool(load_cfg(METHODS["fgfi"]).MODEL.DISTILL.TEACHER.WEIGHTS),
        "ms": ms,
        "ratio_to_student_plus_teacher_forward": {m: ms[m] / budget for m in METHODS},
        "ratio_to_student": {m: ms[m] / ms["student"] for m in METHODS},
    }


def markdown(result):
    ms = result["ms"]
    lines = [
        "| step | ms | vs student | vs student + teacher forward |",
        "|---|---|---|---|",
        f"| student (RetinaNet) training step | {ms['student']:.0f} | 1.00x | |",
        f"| teacher (Faster R-CNN) forward | {ms['teacher_forward']:.0f} | | |",
    ]
    for m in METHODS:
        lines.append(
            f"| distiller step, {m} | {ms[m]:.0f} | {result['ratio_to_student'][m]:.2f}x | "
            f"{result['ratio_to_student_plus_teacher_forward'][m]:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    os.chdir(REPO)  # the configs name the teacher's files relative to the repository
    result = run(args)
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
