#!/usr/bin/env python
"""
The benchmark: MimicDet, its ablations, detectron2's RetinaNet, FCOS and Faster R-CNN, and RetinaNet
distilled from that Faster R-CNN (FGFI, DeFeat, RM+PFI), on DeepForest and on Fashion scenes, with
the same backbone, data, schedule and tuning budget (tools/benchmark_rows.py says which).

    python tools/benchmark.py                              # everything missing, both datasets
    python tools/benchmark.py --dataset deepforest --rows retinanet fcos   # a part
    python tools/benchmark.py --report                     # tables and plots from committed runs
    python tools/benchmark.py --plan                       # the runs still missing, and their time
    python tools/benchmark.py --retime-training            # every row's training step, side by side
    python tools/benchmark.py --rows fcos --smoke --results /tmp/r --output /tmp/o  # a minute
    python tools/benchmark.py --device cuda --pack runs.json ...   # on a GPU machine, then here:
    python tools/benchmark.py --unpack runs.json                   # its results into benchmarks/

Each training is one *run* (dataset, row, variant, seed). When it finishes, its result (final
COCOEvaluator metrics, the AP-vs-iteration curve from periodic evaluation, seconds per iteration,
inference ms per image at batch 1 on the deploy model, params, GFLOPs, config, overrides, command,
seed, date) is written to ``<results>/runs/<dataset>/<row>/<variant>-seed<k>.json`` (commit it).
A run whose result exists is never trained again; an interrupted training resumes from its last
checkpoint in ``<output>`` if its command is unchanged (else it starts again). So the benchmark
runs in parts, over as many sittings as it needs.

Order: each tuned detector's learning-rate sweep (seed 0), then its own key at the best rate; then
the chosen variant's reported seeds (1..n: seed 0 chose the variant on val, so it is not reported),
for tuned rows, ablations and distilled students alike (a student reads the Faster R-CNN run of
the same seed as teacher).

Outputs of --report (also written after every run): ``<results>/results.json``,
``<results>/<dataset>.md`` and the plots ``<results>/<dataset>_ap_curves.png``,
``<results>/<dataset>_speed_accuracy.png``.
"""

import argparse
import datetime
import functools
import hashlib
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from benchmark_report import load_runs, ranking_ap, write_report  # noqa: E402
from benchmark_rows import DATASETS, LEARNING_RATES, ROWS, root_row, variant_name  # noqa: E402
from prepare_deepforest import sha256  # noqa: E402
from quiet_timing import quiet_window  # noqa: E402

DEFAULT_RESULTS = REPO / "benchmarks"
DEFAULT_OUTPUT = REPO / "output" / "benchmark"
# data-loader workers per training with --device cuda
CUDA_LOADER_WORKERS = 4
# --smoke: iterations per run, and the one learning rate of its sweep
SMOKE_ITERS, SMOKE_LR = 3, 0.005  # detectron2 times the steps from the third on
# AP below this at the end of training: the run did not learn (flagged, never averaged in)
LEARNED_MIN_AP = 1.0
# the training records (every 20 iterations) whose median read_metrics keeps per loss term and
# sample count: the last 200 iterations, after the last learning-rate step
END_OF_TRAINING_RECORDS = 10
FINAL_KEYS = {
    "AP": "bbox/AP", "AP50": "bbox/AP50", "AP75": "bbox/AP75",
    "APs": "bbox/APs", "APm": "bbox/APm", "APl": "bbox/APl",
}  # fmt: skip


# ---------------------------------------------------------------------------- runs and variants
def is_lazy_path(config):
    return str(config).endswith(".py")


def is_lazy(row):
    return is_lazy_path(row.config)


def config_path(dataset, row):
    return f"{DATASETS[dataset].configs}/{row.config}"


def result_path(results, dataset, row_name, variant, seed):
    return Path(results) / "runs" / dataset / row_name / f"{variant}-seed{seed}.json"


def load_result(results, dataset, row_name, variant, seed):
    path = result_path(results, dataset, row_name, variant, seed)
    return json.loads(path.read_text()) if path.is_file() else None


def write_result(path, result):
    """Writes a run's result (or its command record) as JSON, whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def pack_runs(results, packed):
    """
    Every run result under ``results`` in the one file ``packed`` (a GPU machine's run tool
    brings back few files): ``{"runs": {"<dataset>/<row>/<variant>-seed<k>.json": result}}``.
    """
    root = Path(results) / "runs"
    runs = {
        path.relative_to(root).as_posix(): json.loads(path.read_text())
        for path in sorted(root.glob("*/*/*-seed*.json"))
    }
    Path(packed).parent.mkdir(parents=True, exist_ok=True)
    Path(packed).write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    print(f"[benchmark] packed {len(runs)} run results into {packed}", flush=True)
    return runs


def unpack_runs(packed, results, benchmark_schedule=True):
    """
    Writes the results of a :func:`pack_runs` file under ``results``. Checks them all first and
    writes none if one is malformed, of an unknown dataset or row, of another schedule than its
    dataset's (with ``benchmark_schedule``: a smoke run's, say) or would replace a different
    result already there (named: remove it to replace it); an identical one is left as it is.
    Returns the paths written.
    """
    try:
        runs = json.loads(Path(packed).read_text())["runs"]
        items = list(runs.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SystemExit(f"--unpack {packed}: not a file of --pack ({e!r})")
    writes = []
    for name, result in items:
        try:
            path = result_path(
                results, result["dataset"], result["row"], result["variant"], result["seed"]
            )
        except (KeyError, TypeError):
            raise SystemExit(f"--unpack {packed}: {name} lacks its dataset, row, variant or seed")
        if result["dataset"] not in DATASETS or result["row"] not in ROWS:
            raise SystemExit(f"--unpack {packed}: {name}: unknown dataset or row")
        if not isinstance(result["seed"], int) or result["seed"] < 0:
            raise SystemExit(f"--unpack {packed}: {name}: seed {result['seed']!r}")
        schedule = DATASETS[result["dataset"]].max_iter
        if benchmark_schedule and result.get("max_iter") != schedule:
            raise SystemExit(
                f"--unpack {packed}: {name} ran {result.get('max_iter')} iterations, not the "
                f"benchmark's {schedule}: unpack it into another --results folder"
            )
        if path.relative_to(Path(results) / "runs").as_posix() != name:
            raise SystemExit(f"--unpack {packed}: {name} holds the result of {path.name}")
        if path.is_file():
            if json.loads(path.read_text()) != result:
                raise SystemExit(
                    f"--unpack {packed}: {path} exists with another result; nothing was written"
                    " (remove it to replace it)"
                )
            continue
        writes.append((path, result))
    for path, result in writes:
        write_result(path, result)
    print(f"[benchmark] unpacked {len(writes)} new run results into {results}", flush=True)
    return [path for path, _ in writes]


def read_config(dataset, row):
    """The row's config as train_net.py reads it now (yacs with the project's keys, or
    LazyConfig)."""
    path = str(REPO / config_path(dataset, row))
    if is_lazy(row):
        from detectron2.config import LazyConfig

        return LazyConfig.load(path)
    from mimicdet import get_mimicdet_cfg

    return get_mimicdet_cfg(path)


# parsed once per process, and only read
load_config = functools.lru_cache(maxsize=None)(read_config)


def config_digest(dataset, row):
    """
    A digest of the row's config as train_net.py resolves it before the run's overrides: its file,
    the files it reads and the project's defaults. Part of what defines a run, so a run folder of
    an earlier config is neither resumed nor read back: its checkpoint would load into the new
    model with a warning for each missing or unexpected key (RetinaNet's head gained GroupNorm
    while its runs were under way, 2026-12-05). Read afresh: a sweep's process outlives edits.

    It errs on the side of training again: any new project key or detectron2 version changes
    every yacs row's digest, but for the distiller's keys (``MODEL.DISTILL``), which only a
    distilled row reads. A LazyConfig's callables count by name only, so an edit inside one
    (FCOS's ``group_norm``) goes unseen. Results record it; they are not checked against it.
    """
    cfg = read_config(dataset, row)
    if is_lazy(row):
        from omegaconf import OmegaConf

        # a LazyConfig holds callables (targets, norm functions): named, not repr'd with an address
        named = lambda o: getattr(o, "__qualname__", type(o).__name__)  # noqa: E731
        text = json.dumps(OmegaConf.to_container(cfg), sort_keys=True, default=named)
    else:
        if row.teacher is None:
            # the distiller's keys changed under runs of MimicDet and Faster R-CNN on 2026-12-06,
            # which never read them; a distilled row's opts make its config a Distiller
            cfg = cfg.clone()
            cfg.MODEL.pop("DISTILL")
        text = cfg.dump()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_value(dataset, row):
    """The value of ``row.key`` in the row's config, as one of the key's candidates."""
    node = load_config(dataset, row)
    for part in row.key.name.split("."):
        node = node[part]
    return row.key.read(node)


def schedule_opts(dataset, row, max_iter, eval_period, device):
    """
    Overrides giving every row the dataset's schedule: ``max_iter`` with the config's warm-up and
    LR steps scaled in proportion (the LazyConfig scheduler is in fractions of train.max_iter
    already), periodic evaluation and checkpoints (for resuming), and the device.
    """
    checkpoint_period = eval_period * max(1, 200 // eval_period)
    # a GPU waits on one loader worker (the configs' 1 is sized for the 2-core CPU)
    workers = CUDA_LOADER_WORKERS if device == "cuda" else None
    if is_lazy(row):
        return [
            f"train.max_iter={max_iter}",
            f"train.eval_period={eval_period}",
            f"train.checkpointer.period={checkpoint_period}",
            f"train.device={device}",
        ] + ([f"dataloader.train.num_workers={workers}"] if workers else [])
    cfg = load_config(dataset, row)
    scale = max_iter / cfg.SOLVER.MAX_ITER
    steps = tuple(sorted({round(s * scale) for s in cfg.SOLVER.STEPS} & set(range(1, max_iter))))
    warmup = max(1, round(cfg.SOLVER.WARMUP_ITERS * scale))
    return [
        "SOLVER.MAX_ITER", str(max_iter), "SOLVER.STEPS", str(steps),
        "SOLVER.WARMUP_ITERS", str(warmup), "TEST.EVAL_PERIOD", str(eval_period),
        "SOLVER.CHECKPOINT_PERIOD", str(checkpoint_period), "MODEL.DEVICE", device,
    ] + (["DATALOADER.NUM_WORKERS", str(workers)] if workers else [])  # fmt: skip


def smoke_opts(row):
    """A smoke run's small inputs and few candidates, so that its evaluation of an untrained
    model takes seconds (the LazyConfig FCOS keeps its input size)."""
    if is_lazy(row):
        return ["model.test_topk_candidates=100", "model.max_detections_per_image=20"]
    return [
        "INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MIN_SIZE_TEST", "160",
        "MODEL.MIMICDET.REFINE.TOPK_TEST", "100", "TEST.DETECTIONS_PER_IMAGE", "20",
    ]  # fmt: skip


def lr_opts(row, lr):
    if is_lazy(row):
        # detectron2's get_default_optimizer_params gives every group base_lr itself
        return [f"optimizer.lr={lr}", f"optimizer.params.base_lr={lr}"]
    return ["SOLVER.BASE_LR", str(lr)]


def seed_opts(row, seed, output_dir):
    if is_lazy(row):
        return [f"train.seed={seed}", f"train.output_dir={output_dir}"]
    return ["SEED", str(seed), "OUTPUT_DIR", str(output_dir)]


# ---------------------------------------------------------------------------- reading a training
def read_metrics(metrics_file, warmup_iters, max_iter=None):
    """
    From detectron2's metrics.json (a JSON record per line): the final evaluation, the curve of
    every periodic one ``[[iteration, AP, AP50], ...]``, the loss curve, the median seconds per
    iteration after ``warmup_iters``, and each loss term and sample count at the end of training
    (the median of its last :data:`END_OF_TRAINING_RECORDS` records): what the heads trained on,
    kept after the run folder is gone.
    """
    records = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line]
    curve, losses, times, final, trained = [], [], [], {}, []
    for r in records:
        if "bbox/AP" in r:
            # iterations done; the evaluation after training is logged one past the last step
            done = r["iteration"] + 1 if max_iter is None else min(r["iteration"] + 1, max_iter)
            curve.append([done, r["bbox/AP"], r.get("bbox/AP50")])
            final = {k: r.get(v) for k, v in FINAL_KEYS.items()}
        if "total_loss" in r:
            losses.append([r["iteration"] + 1, r["total_loss"]])
            trained.append(r)
        if "time" in r and r.get("iteration", 0) >= warmup_iters:
            times.append(r["time"])
    if not times:  # a run shorter than the warm-up
        times = [r["time"] for r in records if "time" in r]
    # a resumed training re-evaluates nothing twice, but keep one point per iteration anyway
    curve = sorted({c[0]: c for c in curve}.values())
    end = trained[-END_OF_TRAINING_RECORDS:]
    terms = sorted({k for r in end for k in r if k.startswith("loss_") or "/num_" in k})
    return {
        "final": final,
        "curve": curve,
        "loss_curve": losses,
        "train_s_per_iter": statistics.median(times) if times else None,
        "end_of_training": {
            k: statistics.median(r[k] for r in end if k in r) for k in terms
        },
    }


def finished(metrics_file, max_iter):
    """True if the training's metrics end with the evaluation after its last step."""
    if not Path(metrics_file).is_file():
        return False
    curve = read_metrics(metrics_file, 0, max_iter)["curve"]
    return bool(curve) and curve[-1][0] == max_iter


# --plan's label of a teacher trained again because its checkpoint is not on this machine
AGAIN = " again (no checkpoint here)"
# written into a run's output folder before its training starts: the train_net.py arguments
RUN_COMMAND_FILE = "benchmark_command.json"
# written into a MimicDet run's output folder after its training: both heads' val metrics
T_HEAD_FILE = "t_head_eval.json"


def recorded_command(out):
    """The arguments ``out``'s training was started with (:func:`resumable`), None if unrecorded,
    "unreadable" if the record is damaged (which matches no command)."""
    command_file = out / RUN_COMMAND_FILE
    if not command_file.is_file():
        return None
    try:
        return json.loads(command_file.read_text())
    except json.JSONDecodeError:
        return "unreadable"


CONFIG_DIGEST_ARGUMENT = "config_sha256="


def same_command(recorded, arguments):
    """Whether a run folder's recorded arguments are ``arguments``. A folder recorded before the
    config digest was (2026-12-05) matches on the rest of its arguments: the runs under way
    then, FCOS's and RetinaNet's GroupNorm ones (RetinaNet's earlier folders were deleted)."""
    if isinstance(recorded, list) and not any(
        str(a).startswith(CONFIG_DIGEST_ARGUMENT) for a in recorded
    ):
        arguments = [a for a in arguments if not a.startswith(CONFIG_DIGEST_ARGUMENT)]
    return recorded == list(arguments)


def resumable(out, arguments):
    """
    Whether ``out`` holds an interrupted training of exactly ``arguments`` (train_net.py's, and
    a student's teacher digest) to resume. Otherwise ``out`` is emptied first: a checkpoint of
    other arguments (say the dataset's schedule grew since) would keep the old run's weights and
    finish them on the new run's learning-rate steps, and a metrics.json left without a checkpoint
    would mix the old run's records into the new one's curve and step times. Either way ``out``
    then records ``arguments``.
    """
    recorded = recorded_command(out)
    resume = (out / "last_checkpoint").is_file() and same_command(recorded, arguments)
    if not resume and out.exists():
        why = "another command" if recorded is not None else f"no {RUN_COMMAND_FILE}"
        print(f"[benchmark] {out}: an earlier training of {why}: from scratch", flush=True)
        shutil.rmtree(out)
    write_result(out / RUN_COMMAND_FILE, list(arguments))  # whole or not at all
    return resume


# what the benchmark itself rewrites after every run: uncommitted, they leave the code as it is
BENCHMARK_OUTPUTS = ("benchmarks", "README.md", "MODEL_ZOO.md")


def code_version():
    """The commit the run's code came from, "+dirty" if the work tree had changes (other than
    the benchmark's own outputs)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        outputs = [f":(exclude){path}" for path in BENCHMARK_OUTPUTS]
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *outputs],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return None
    return (commit + ("+dirty" if dirty else "")) or None


def cpu_seconds():
    """CPU seconds used so far by this process's finished children (with theirs), and by every
    process on the machine (None without /proc/stat)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        machine_s = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        machine_s = None
    return children.ru_utime + children.ru_stime, machine_s


def cpu_share(before, after):
    """The share of the machine's CPU time between two :func:`cpu_seconds` that went to the
    children run in between: near 1.0 when they ran alone, lower when other work competed with
    them (their seconds per iteration are then slower than the machine's)."""
    own, machine_s = after[0] - before[0], None if after[1] is None else after[1] - before[1]
    if not machine_s or machine_s <= 0:
        return None
    return round(min(own / machine_s, 1.0), 3)


def learned(result):
    ap = result["final"].get("AP")
    return ap is not None and ap == ap and ap >= LEARNED_MIN_AP


# ---------------------------------------------------------------------------- inference cost
def _deform_conv_flop_jit(weight_index):
    """fvcore handle for a deformable conv whose weight is input ``weight_index``: a dense conv's
    multiply-adds (the bilinear sampling is not counted)."""

    def handle(inputs, outputs):
        weight = inputs[weight_index].type().sizes()
        out = outputs[0].type().sizes()
        return out[0] * out[1] * out[2] * out[3] * weight[1] * weight[2] * weight[3]

    return handle


# weight index per op: torchvision's (input, weight, offset, ...), ours (input, offset, weight)
DEFORM_CONV_OPS = {"torchvision::deform_conv2d": 1, "mimicdet::deform_conv2d": 2}


class _TensorInOut(torch.nn.Module):
    """``image (3, H, W) -> (boxes, scores)`` around a detectron2 model, for fvcore's tracer."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        instances = self.model([{"image": image}])[0]["instances"]
        return instances.pred_boxes.tensor, instances.scores


def inference_cost(model, image, skip_params=()):
    """Parameters (those not in ``skip_params``) and GFLOPs of ``model`` on one ``(H, W, 3)``
    image in the model's input format (fvcore; None if tracing fails)."""
    from fvcore.nn import FlopCountAnalysis

    skip = set(skip_params)
    params = sum(p.numel() for n, p in model.named_parameters() if n not in skip)
    tensor = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
    try:
        flops = FlopCountAnalysis(_TensorInOut(model).eval(), (tensor,))
        for op, weight_index in DEFORM_CONV_OPS.items():
            flops.set_op_handle(op, _deform_conv_flop_jit(weight_index))
        flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        with torch.no_grad():
            gflops = flops.total() / 1e9
    except Exception as e:  # tracing can fail on some detectron2 / torch versions
        print(f"[benchmark] FLOP count failed: {e!r}", flush=True)
        gflops = None
    return params, gflops


# ---------------------------------------------------------------------------- training cost
# --retime-training: untimed steps per model, then rounds of timed steps per model in turn.
# 15 timed steps (5 x 3) were too few: two passes on DeepForest, an hour apart, put Faster R-CNN
# at 0.91x and 1.23x of MimicDet's step; 40 steps a row keep a pass of 12 rows under 10 minutes
TRAIN_WARMUP_STEPS, TRAIN_TIMED_STEPS, TRAIN_ROUNDS = 2, 10, 4
# the timed steps run at the warm-up's first rate: a step costs the same at any rate, and no
# model diverges from its initialization in the few steps timed
TRAIN_TIMING_LR_FACTOR = 0.001


def random_teacher_if_absent(cfg):
    """
    For timing only: a distiller whose teacher checkpoint is not on this machine gets a randomly
    initialized teacher (``ALLOW_RANDOM``) instead of build_teacher's error, since a step runs
    the same teacher layers whatever their weights.
    """
    teacher = cfg.MODEL.DISTILL.TEACHER
    if teacher.WEIGHTS and not Path(teacher.WEIGHTS).is_file():
        teacher.WEIGHTS, teacher.ALLOW_RANDOM = "", True


def build_training(config, opts, device="cpu"):
    """
    The training of ``config`` + ``opts`` as train_net.py builds it (model, optimizer and training
    data loader, yacs or LazyConfig), as a detectron2 ``SimpleTrainer`` whose ``run_step`` is one
    training step. The model keeps its initialization: a step costs the same whatever the
    weights. So does a distiller's teacher whose checkpoint is not on this machine (the step runs
    the same teacher layers either way).
    """
    from detectron2.engine import SimpleTrainer

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from train_net import Trainer

    if is_lazy_path(config):
        from detectron2.config import LazyConfig, instantiate

        cfg = LazyConfig.apply_overrides(LazyConfig.load(str(REPO / config)), list(opts))
        model = instantiate(cfg.model).to(device)
        cfg.optimizer.params.model = model
        optimizer, loader = instantiate(cfg.optimizer), instantiate(cfg.dataloader.train)
    else:
        from mimicdet import get_mimicdet_cfg

        cfg = get_mimicdet_cfg(REPO / config, opts)
        cfg.MODEL.DEVICE = device
        random_teacher_if_absent(cfg)
        model = Trainer.build_model(cfg)
        optimizer, loader = Trainer.build_optimizer(cfg, model), Trainer.build_train_loader(cfg)
    for group in optimizer.param_groups:
        group["lr"] *= TRAIN_TIMING_LR_FACTOR
    return SimpleTrainer(model, loader, optimizer)


def quartiles(values):
    """The first and third quartiles of ``values`` (at least two)."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [q1, q3]


def time_training_steps(trainers, warmup, steps, rounds, device="cpu"):
    """
    ``{name: [seconds per step]}`` of every trainer of ``trainers`` (name -> ``SimpleTrainer``):
    ``warmup`` untimed steps each, then ``rounds`` rounds in which each runs ``steps`` timed
    steps in turn, the order turning each round, so that all see the same machine load.
    """
    from detectron2.utils.events import EventStorage

    def step(trainer):
        with EventStorage(trainer.iter) as trainer.storage:
            start = time.perf_counter()
            trainer.run_step()
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        trainer.iter += 1
        return seconds

    names = list(trainers)
    for name in names:
        for _ in range(warmup):
            step(trainers[name])
    times = {name: [] for name in names}
    for index in range(rounds):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            times[name] += [step(trainers[name]) for _ in range(steps)]
    return times


def build_predictor(config, opts, weights, device="cpu"):
    """demo.py's Predictor for ``config`` + ``opts`` with ``weights`` (batch 1, eval mode)."""
    from demo import Predictor

    if is_lazy_path(config):
        # the weights pair first: demo's Predictor reads it as a pair, the rest as key=value
        model_opts = [o for o in opts if o.startswith("model.")]
        return Predictor(REPO / config, ["MODEL.WEIGHTS", str(weights), *model_opts], device)
    return Predictor(REPO / config, [*opts, "MODEL.WEIGHTS", str(weights)], device)


class Yardstick:
    """
    What every run's inference is timed against, image by image: the dataset's shared
    MobileNetV2-FPN backbone alone (its RetinaNet config, initial weights: a convolution's speed
    does not depend on them). A run's inference divided by the yardstick's, timed interleaved,
    stays the same under another process's load or on another CPU of the same kind, so that runs
    timed in different sittings compare (the report scales it back to milliseconds).
    """

    def __init__(self, dataset, device="cpu"):
        from demo import Predictor

        config = Path(DATASETS[dataset].configs) / "retinanet_MNV2_FPN.yaml"
        self.predictor = Predictor(REPO / config, ["MODEL.WEIGHTS", ""], device)

    @torch.no_grad()
    def __call__(self, image_bgr):
        p = self.predictor
        image = image_bgr[:, :, ::-1] if p.input_format == "RGB" else image_bgr
        resized = p.aug.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
        return p.model.backbone(p.model.preprocess_image([{"image": tensor}]).tensor)


def time_images(models, images, device="cpu"):
    """
    ``{name: [ms per image]}`` of each image through every callable of ``models`` (name ->
    ``model(image_bgr)``), one image at a time, the models interleaved image by image (their
    order turning each image) so that all see the same machine load.
    """
    names = list(models)
    times = {name: [] for name in names}
    for index, image in enumerate(images):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            start = time.perf_counter()
            models[name](image)
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) * 1000)
    return times


def time_rounds(models, images, rounds, device="cpu", warmup=2):
    """``{name: [ms per image]}`` of ``rounds`` passes of :func:`time_images` over ``images``,
    after ``warmup`` untimed images: the re-timing passes' protocol."""
    time_images(models, images[:warmup], device)
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, ms in time_images(models, images, device).items():
            times[name] += ms
    return times


def measure_inference(
    config, opts, weights, images, yardstick, device="cpu", deploy=False, warmup=2
):
    """
    Median ms per image (batch 1, after ``warmup`` untimed images) of the model ``config`` +
    ``opts`` builds with ``weights`` (MimicDet: without its training-only T-head, which deploy
    checkpoints lack), the median ms of ``yardstick`` timed interleaved with it, params and
    GFLOPs.
    """
    from convert_to_deploy import training_only_keys

    predictor = build_predictor(config, opts, weights, device)
    models = {"model": predictor, "yardstick": yardstick}
    with quiet_window():  # in a lane: the other lanes paused, this one at their threads too
        time_images(models, images[:warmup], device)
        times = time_images(models, images, device)
        threads = torch.get_num_threads()
    model = predictor.model
    skip = training_only_keys(dict(model.named_parameters())) if deploy else ()
    resized = predictor.aug.get_transform(images[0]).apply_image(images[0])
    image = resized[:, :, ::-1] if predictor.input_format == "RGB" else resized
    params, gflops = inference_cost(model.cpu(), image.copy(), skip)
    return {
        "infer_ms": statistics.median(times["model"]),
        "yardstick_ms": statistics.median(times["yardstick"]),
        "params": params,
        "gflops": gflops,
        "infer_threads": threads,
    }


def machine(device="cpu", infer_threads=None):
    """The device, in words, its last word "CPU" or "CUDA"; on the CPU with the threads this
    process trains at, and ``infer_threads`` where inference was timed at others (a lane: one
    thread each beside the others, every core in its quiet window)."""
    if device == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    if infer_threads is None or infer_threads == threads:
        threads = f"{threads} threads"
    else:
        threads = f"{threads} threads (inference timed at {infer_threads})"
    return f"{cpu}, {threads}, torch {torch.__version__}, CPU"


def now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def deploy_opts(row, opts):
    """The overrides that build a run's deploy model: the variant's, plus the row's own change
    unless it is training-only (a distiller's student is the plain detector)."""
    return list(opts) + ([] if row.teacher is not None else list(row.opts))


def deploy_weights(row, out):
    """The run's deploy checkpoint: MimicDet without its T-head, a distiller's student alone,
    else ``model_final.pth`` itself (converted once, next to it)."""
    from convert_to_deploy import convert

    weights = out / "model_final.pth"
    if not (row.deploy or row.teacher is not None):
        return weights
    deploy = out / "model_deploy.pth"
    if not deploy.is_file() or deploy.stat().st_mtime < weights.stat().st_mtime:
        convert(str(weights), str(deploy))
    return deploy


def val_images(dataset, count=None):
    """The first ``count`` (default: the dataset's ``timing_images``) val images (BGR), the same
    for every row of a dataset."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image

    spec = DATASETS[dataset]
    records = DatasetCatalog.get(spec.val)[: count or spec.timing_images]
    return [read_image(r["file_name"], format="BGR") for r in records]


def teacher_opts(config, weights, variant):
    """A distilled row's overrides that name its teacher: ``config`` with ``weights``, and the
    teacher ``variant``'s own overrides (its swept key must reach its config too: anchors)."""
    return [
        "MODEL.DISTILL.TEACHER.CONFIG_FILE", str(config),
        "MODEL.DISTILL.TEACHER.WEIGHTS", str(weights),
        "MODEL.DISTILL.TEACHER.OPTS", str(list(variant.opts)),
    ]  # fmt: skip


# ---------------------------------------------------------------------------- the pipeline
@dataclass(frozen=True)
class Variant:
    """One tuning point of a detector: its learning rate and the value of its own key."""

    name: str  # "lr0.005" or "lr0.005-anchor16": the run folder and result file stem
    opts: Tuple[str, ...]
    lr: float
    key_value: object  # the config's own value when the variant leaves the key alone


class Benchmark:
    """Trains what is missing, in dependency order, and writes each run's result at once."""

    def __init__(
        self,
        results,
        output,
        device="cpu",
        max_iter=None,
        eval_period=None,
        seeds=None,
        smoke=False,
    ):
        self.results, self.output = Path(results).resolve(), Path(output).resolve()
        self.device, self.seeds_override = device, seeds
        # a smoke run checks the pipeline, not the detectors: one learning rate, no key, tiny
        # inputs, a few iterations, one timed image
        self.smoke = smoke
        self.learning_rates = (SMOKE_LR,) if smoke else LEARNING_RATES
        self._max_iter = max_iter or (SMOKE_ITERS if smoke else None)
        self._eval_period = eval_period

    def max_iter(self, dataset):
        return self._max_iter or DATASETS[dataset].max_iter

    def eval_period(self, dataset):
        return min(self._eval_period or DATASETS[dataset].eval_period, self.max_iter(dataset))

    def schedules(self):
        """{dataset: iterations} of this benchmark's runs, the schedule its report shows."""
        return {dataset: self.max_iter(dataset) for dataset in DATASETS}

    def seeds(self, row_name):
        """The reported seeds: 1..n. Seed 0 is the tuning sweep's, chosen on the val AP it
        reports, so it is kept out of every reported mean (ablations and students alike)."""
        return list(range(1, 1 + (self.seeds_override or ROWS[row_name].seeds)))

    def result(self, dataset, row_name, variant, seed):
        """A committed result of this schedule (one of another schedule counts as missing)."""
        result = load_result(self.results, dataset, row_name, variant, seed)
        if result is not None and result["max_iter"] != self.max_iter(dataset):
            return None
        return result

    # -- tuning
    def sweep(self, dataset, row_name):
        """
        A tuned detector's seed-0 variants as far as they are known: the LR sweep, then, once
        its results all exist, the key's other values at the best LR.
        """
        row = ROWS[row_name]
        current = config_value(dataset, row) if row.key is not None else None
        runs = [
            Variant(variant_name(lr), tuple(lr_opts(row, lr)), lr, current)
            for lr in self.learning_rates
        ]
        if (
            row.key is None
            or self.smoke
            or any(self.result(dataset, row_name, v.name, 0) is None for v in runs)
        ):
            return runs
        lr = self.best(dataset, row_name, runs).lr
        for value in row.key.candidates:
            if value != current:
                opts = lr_opts(row, lr) + row.key.opts(value, is_lazy(row))
                runs.append(Variant(variant_name(lr, row.key, value), tuple(opts), lr, value))
        return runs

    def best(self, dataset, row_name, runs):
        """The variant of ``runs`` with the highest seed-0 final AP (nan counts as -1)."""

        def ap(variant):
            return ranking_ap(self.result(dataset, row_name, variant.name, 0))

        return max(runs, key=ap)

    def chosen(self, dataset, row_name):
        """A tuned detector's best variant once its whole sweep has results, else None; an
        ablation's or distilled row's is its parent's."""
        row = ROWS[row_name]
        if row.parent is not None:
            return self.chosen(dataset, row.parent)
        runs = self.sweep(dataset, row_name)
        if any(self.result(dataset, row_name, v.name, 0) is None for v in runs):
            return None
        return self.best(dataset, row_name, runs)

    def ensure_chosen(self, dataset, row_name):
        """Runs the sweep of the row's tuned detector as far as needed; returns its choice."""
        root = root_row(row_name)
        while self.chosen(dataset, root) is None:
            for variant in self.sweep(dataset, root):
                self.run(dataset, root, variant, 0)
        return self.chosen(dataset, root)

    # -- one run
    def run_dir(self, dataset, row_name, variant_name_, seed):
        return self.output / dataset / row_name / f"{variant_name_}-seed{seed}"

    def train_arguments(
        self, dataset, row, variant, seed, out, extra_opts=(), teacher_sha256=None, config=None
    ):
        """The train_net.py command of one run into ``out``, the options that define the run
        (without its seed and output folder), and the arguments that define it, which a
        checkpoint in ``out`` must have been started with to be resumed (:func:`resumable`)."""
        max_iter, eval_period = self.max_iter(dataset), self.eval_period(dataset)
        train_opts = [*row.opts, *variant.opts, *extra_opts]
        train_opts += schedule_opts(dataset, row, max_iter, eval_period, self.device)
        train_opts += smoke_opts(row) if self.smoke else []
        command = [sys.executable, "train_net.py", "--config-file", config_path(dataset, row)]
        command += train_opts + seed_opts(row, seed, out)
        config = config or config_digest(dataset, row)
        arguments = command[1:] + [CONFIG_DIGEST_ARGUMENT + config]
        arguments += [f"teacher_sha256={teacher_sha256}"] if teacher_sha256 else []
        return command, train_opts, arguments

    def finished_here(self, dataset, out, arguments):
        """Whether ``out`` holds a training of ``arguments`` finished earlier, evaluation
        included, which :meth:`train` reads rather than trains (a checkpoint from before commands
        were recorded, 2026-12-03, is taken as it is)."""
        if not (out / "model_final.pth").is_file():
            return False
        recorded = recorded_command(out)
        same = recorded is None or same_command(recorded, arguments)
        return same and finished(out / "metrics.json", self.max_iter(dataset))

    def teaching_digest(self, dataset, t_row, t_variant, seed, committed):
        """
        The digest of the teacher's checkpoint here if it teaches as it is, else None (it is
        trained first, into other weights): the ``committed`` run's own weights teach whatever
        changed in the commands since, and so do weights of a training finished under the
        current command.
        """
        t_out = self.run_dir(dataset, t_row.name, t_variant.name, seed)
        weights = t_out / "model_final.pth"
        if not weights.is_file():
            return None
        digest = sha256(weights)
        if digest == (committed.get("sha256") or {}).get(weights.name):
            return digest
        t_arguments = self.train_arguments(dataset, t_row, t_variant, seed, t_out)[2]
        return digest if self.finished_here(dataset, t_out, t_arguments) else None

    def steps_done(self, dataset, row_name, variant_name_, seed):
        """
        How many of a run's steps an interrupted training in its folder has done, which the run
        resumes after (0 where it would start from scratch: no checkpoint, one of another
        command, a variant not chosen yet, or a student whose teacher's checkpoint is not here,
        which is trained again and teaches with other weights).
        """
        row = ROWS[row_name]
        out = self.run_dir(dataset, row_name, variant_name_, seed)
        checkpoint = out / "last_checkpoint"
        variants = [*self.sweep(dataset, root_row(row_name)), self.chosen(dataset, row_name)]
        variant = next((v for v in variants if v and v.name == variant_name_), None)
        if variant is None or not (checkpoint.is_file() or (out / "model_final.pth").is_file()):
            return 0
        extra_opts, digest = (), None
        if row.teacher is not None:
            t_row, t_chosen = ROWS[row.teacher], self.chosen(dataset, row.teacher)
            if t_chosen is None:
                return 0
            t_variant = self.teacher_variant(dataset, row, variant, t_chosen)
            committed = self.result(dataset, t_row.name, t_variant.name, seed)
            digest = committed and self.teaching_digest(dataset, t_row, t_variant, seed, committed)
            if not digest:
                return 0
            t_weights = self.run_dir(dataset, t_row.name, t_variant.name, seed) / "model_final.pth"
            extra_opts = teacher_opts(config_path(dataset, t_row), t_weights, t_variant)
        arguments = self.train_arguments(dataset, row, variant, seed, out, extra_opts, digest)[2]
        if self.finished_here(dataset, out, arguments):
            return self.max_iter(dataset)
        if not (checkpoint.is_file() and same_command(recorded_command(out), arguments)):
            return 0
        # detectron2's checkpointers name a checkpoint by the index of the step it ends
        name = checkpoint.read_text().strip()
        if name == "model_final.pth":
            return self.max_iter(dataset)
        index = re.fullmatch(r"model_(\d+)\.pth", name)
        return int(index.group(1)) + 1 if index else 0

    def train(
        self, dataset, row, variant, seed, out, extra_opts=(), teacher_sha256=None, config=None
    ):
        """train_net.py for one run into ``out`` (resumed if interrupted); returns the command,
        the options that define the run (without its seed and output folder) and the training's
        :func:`cpu_share` (None if it had finished earlier). A student's ``teacher_sha256`` is
        part of what defines its run: a teacher trained again gives another run, as does a
        config changed since (``config``: its :func:`config_digest`, read now if None)."""
        command, train_opts, arguments = self.train_arguments(
            dataset, row, variant, seed, out, extra_opts, teacher_sha256, config
        )
        if self.finished_here(dataset, out, arguments):
            print(f"[benchmark] {out} finished training earlier: reading it", flush=True)
            return command, train_opts, None
        # a model_final.pth of another command: resumable() starts it over. Of this one, stopped
        # in the evaluation after its last step: resuming model_final.pth only evaluates it
        if resumable(out, arguments):
            command.insert(2, "--resume")
        print(f"[benchmark] training {dataset} {row.name} {variant.name} seed {seed}", flush=True)
        print("[benchmark] " + shlex.join(command[1:]), flush=True)
        before = cpu_seconds()
        subprocess.run(command, cwd=REPO, check=True)
        share = cpu_share(before, cpu_seconds())
        for periodic in out.glob("model_[0-9]*.pth"):  # resuming needs them no longer
            periodic.unlink()
        return command, train_opts, share

    def run(self, dataset, row_name, variant, seed):
        """Trains one run unless its result exists; returns the result."""
        existing = self.result(dataset, row_name, variant.name, seed)
        if existing is not None:
            return existing
        row = ROWS[row_name]
        if dataset not in row.datasets:
            raise ValueError(f"row {row_name} does not run on {dataset} ({row.datasets} only)")
        out = self.run_dir(dataset, row_name, variant.name, seed)
        teacher_opts, teacher = [], None
        if row.teacher is not None:
            teacher_opts, teacher = self.teacher(dataset, row, variant, seed)
        start, code = time.time(), code_version()  # the code the training is about to load
        config = config_digest(dataset, row)  # and the config
        command, train_opts, share = self.train(
            dataset, row, variant, seed, out, teacher_opts, teacher and teacher["sha256"], config
        )
        max_iter = self.max_iter(dataset)
        portable = lambda text: text.replace(str(self.output), "<output>")  # noqa: E731
        result = {
            "dataset": dataset,
            "row": row_name,
            "variant": variant.name,
            "seed": seed,
            "config": config_path(dataset, row),
            "config_sha256": config,
            # the output folder is this machine's; results are portable without it
            "opts": [portable(o) for o in train_opts],
            "command": "python " + portable(shlex.join(command[1:])),
            "max_iter": max_iter,
            "eval_period": self.eval_period(dataset),
            "date": now(),
            "machine": machine(self.device),
            "code": code,
            "wall_s": round(time.time() - start),
            **read_metrics(out / "metrics.json", min(50, max_iter // 4), max_iter),
            # below CONTENDED_SHARE, other work slowed this training: its s/iter is flagged
            "train_cpu_share": share,
            **self.time_inference(dataset, row, variant.opts, out),
            # MimicDet's T-head scored as a detector, and each head's classes on the other head's
            # boxes: None for the rows without one
            **self.evaluate_t_head(dataset, row, train_opts, out),
            # the checkpoints stay on the machine that trained them (no weights in git): their
            # digests let MODEL_ZOO.md name the files a published run must match
            "sha256": {
                path.name: sha256(path)
                for path in sorted({out / "model_final.pth", deploy_weights(row, out)})
            },
            "teacher": teacher,
        }
        result["machine"] = machine(self.device, result.pop("infer_threads"))
        result["learned"] = learned(result)
        path = result_path(self.results, dataset, row_name, variant.name, seed)
        # COCOeval's nan (no detections) is not JSON: it becomes null
        result = json.loads(json.dumps(result), parse_constant=lambda constant: None)
        write_result(path, result)
        print(f"[benchmark] {path.relative_to(self.results)}: AP {result['final'].get('AP')}")
        write_report(self.results, max_iters=self.schedules())  # tables follow every run
        return result

    def teacher(self, dataset, row, variant, seed):
        """
        The teacher's options and record: its detector's chosen variant, trained with the same
        seed. RM+PFI read the teacher's RPN per student anchor, so there the teacher is the
        variant at its best LR whose anchors are the student's (both sweep the same anchor key).
        A teacher whose checkpoint is not on this machine is trained again into the output
        folder; its committed result stays, and the student's records the retrained one's AP.
        """
        t_row = ROWS[row.teacher]
        t_variant = self.teacher_variant(
            dataset, row, variant, self.ensure_chosen(dataset, t_row.name)
        )
        t_out = self.run_dir(dataset, row.teacher, t_variant.name, seed)
        weights = t_out / "model_final.pth"
        committed = self.result(dataset, row.teacher, t_variant.name, seed)
        if committed is None:
            committed = self.run(dataset, row.teacher, t_variant, seed)
        digest = self.teaching_digest(dataset, t_row, t_variant, seed, committed)
        if digest is None:  # other weights, or none: (re)trained under the current command
            if not weights.is_file():
                print(f"[benchmark] the teacher's checkpoint {t_out} is not here: training it")
            self.train(dataset, t_row, t_variant, seed, t_out)
            digest = sha256(weights)
        teacher = {
            "row": row.teacher,
            "variant": t_variant.name,
            "seed": seed,
            "AP": read_metrics(t_out / "metrics.json", 0, self.max_iter(dataset))["final"]["AP"],
            # the weights that taught: a retrained teacher's differ from its committed result's
            "sha256": digest,
        }
        opts = teacher_opts(config_path(dataset, t_row), weights, t_variant)
        return opts, teacher

    def teacher_variant(self, dataset, row, variant, t_chosen):
        """The teacher's variant for a student ``variant``: its detector's choice ``t_chosen``,
        or for RM+PFI the variant at the same LR whose anchors are the student's."""
        if not row.needs_teacher_anchors or t_chosen.key_value == variant.key_value:
            return t_chosen
        same = [
            v
            for v in self.sweep(dataset, row.teacher)
            if v.lr == t_chosen.lr and v.key_value == variant.key_value
        ]
        if not same:
            raise ValueError(
                f"{row.name} needs a {row.teacher} variant at lr {t_chosen.lr:g} with the student's"
                f" {ROWS[row.teacher].key.label} {variant.key_value}, and the sweep has none"
            )
        return same[0]

    def time_inference(self, dataset, row, opts, out):
        """Inference cost of the run's deploy model: the student of a distiller, MimicDet without
        its T-head, else the model itself."""
        return measure_inference(
            config_path(dataset, row),
            deploy_opts(row, opts),
            deploy_weights(row, out),
            val_images(dataset, 1 if self.smoke else None),
            Yardstick(dataset, self.device),
            self.device,
            row.deploy,
        )

    def evaluate_t_head(self, dataset, row, train_opts, out):
        """
        A MimicDet run's final COCO metrics of its T-head, run as a two-stage detector on the
        refined boxes of its final checkpoint, as ``t_head_final``: how far the deployed S-head
        is from its teacher; and as ``mixed_heads_final``, each head's classes on the other
        head's boxes, which split that gap into classification and localization
        (``tools/evaluate_teacher.py --mixed``, the same val split and COCOEvaluator as the run's
        own). Both None for a row without a T-head.
        """
        if not row.t_head:
            return {"t_head_final": None, "mixed_heads_final": None}
        from evaluate_teacher import MIXED  # its results' names with --mixed

        path = out / T_HEAD_FILE
        command = [sys.executable, "tools/evaluate_teacher.py"]
        # a smoke run (the GPU check's CPU rehearsal) checks that the heads are scored; the
        # mixes would double that time on the full val split, and have tests of their own
        mixed = not self.smoke
        command += ["--mixed"] if mixed else []
        command += ["--config-file", config_path(dataset, row), "--output", str(path)]
        command += [*train_opts, "MODEL.WEIGHTS", str(out / "model_final.pth")]
        print(f"[benchmark] scoring the T-head of {out}", flush=True)
        subprocess.run(command, cwd=REPO, check=True)
        scored = json.loads(path.read_text())
        return {
            "t_head_final": scored["t_head"],
            "mixed_heads_final": {name: scored[name] for name in MIXED} if mixed else None,
        }

    def write_timing(self, dataset, name, timing):
        """Writes a re-timing pass's ``timing`` to ``runs/<dataset>/<name>``; returns it."""
        path = self.results / "runs" / dataset / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(timing, indent=1) + "\n")
        print(f"[benchmark] wrote {path}", flush=True)
        return timing

    def retime(self, dataset, rounds=3):
        """
        Times the chosen variant's deploy model of every row whose first reported seed's
        checkpoint is on this machine, and the :class:`Yardstick`, interleaved image by image,
        ``rounds`` times, in one process, so that every row sees the same machine load; writes
        ``runs/<dataset>/timing.json``, which the report prefers to the per-run timings.
        """
        predictors, variants = {}, {}
        for row_name, row in ROWS.items():
            chosen = self.chosen(dataset, row_name)
            if chosen is None or dataset not in row.datasets:
                continue
            seed = self.seeds(row_name)[0]
            out = self.run_dir(dataset, row_name, chosen.name, seed)
            if not (out / "model_final.pth").is_file():
                continue
            weights = deploy_weights(row, out)
            config = config_path(dataset, row)
            predictors[row_name] = build_predictor(
                config, deploy_opts(row, chosen.opts), weights, self.device
            )
            variants[row_name] = chosen.name
        if not predictors:
            raise SystemExit(f"--retime: no chosen {dataset} checkpoint in {self.output}")
        predictors["yardstick"] = Yardstick(dataset, self.device)
        images = val_images(dataset, 1 if self.smoke else None)
        times = time_rounds(predictors, images, rounds, self.device)
        timing = {
            "date": now(),
            "machine": machine(self.device),
            "images": len(images),
            "rounds": rounds,
            "yardstick_ms": statistics.median(times.pop("yardstick")),
            "rows": {
                name: {"variant": variants[name], "infer_ms": statistics.median(ms)}
                for name, ms in times.items()
            },
        }
        return self.write_timing(dataset, "timing.json", timing)

    def retimed_variants(self, dataset):
        """The rows a --retime-training pass times, with their chosen variants: every row of
        ``dataset`` whose detector (and, for a distilled row, whose teacher) has chosen."""
        timed = {}
        for row_name, row in ROWS.items():
            chosen = self.chosen(dataset, row_name)
            if chosen is None or dataset not in row.datasets:
                continue
            if row.teacher is not None and self.chosen(dataset, row.teacher) is None:
                print(f"[benchmark] {row_name}: its teacher has no chosen variant: skipped")
                continue
            timed[row_name] = chosen
        return timed

    def retime_training(self, dataset):
        """
        Times a training step of every row's chosen variant (a distilled row with its teacher,
        the teacher's checkpoint of the first reported seed where it is on this machine), all
        built in one process and interleaved (:func:`time_training_steps`), so that every row
        sees the same machine load; writes ``runs/<dataset>/train_timing.json``, whose seconds
        per step the report prefers to those of runs trained in different sittings (None when
        no row has chosen its variant yet).

        Like a training run, a pass is not redone: where ``train_timing.json`` already times
        exactly the rows and variants this pass would, it is kept and returned (delete it to
        time again), so that a stages file holding this pass can be started over after a stop.
        """
        timed = self.retimed_variants(dataset)
        path = self.results / "runs" / dataset / "train_timing.json"
        if timed and path.is_file():
            kept = json.loads(path.read_text())
            if {name: r["variant"] for name, r in kept["rows"].items()} == {
                name: chosen.name for name, chosen in timed.items()
            }:
                print(
                    f"[benchmark] --retime-training: {path} already times every chosen {dataset}"
                    " row at its variant: kept (delete it to time again)",
                    flush=True,
                )
                return kept
        trainers, variants = {}, {}
        max_iter, eval_period = self.max_iter(dataset), self.eval_period(dataset)
        for row_name, chosen in timed.items():
            row = ROWS[row_name]
            opts = [*row.opts, *chosen.opts]
            if row.teacher is not None:
                t_chosen = self.chosen(dataset, row.teacher)
                t_variant = self.teacher_variant(dataset, row, chosen, t_chosen)
                t_out = self.run_dir(dataset, row.teacher, t_variant.name, self.seeds(row_name)[0])
                t_config = REPO / config_path(dataset, ROWS[row.teacher])
                opts += teacher_opts(t_config, t_out / "model_final.pth", t_variant)
            opts += schedule_opts(dataset, row, max_iter, eval_period, self.device)
            opts += smoke_opts(row) if self.smoke else []
            print(f"[benchmark] building {dataset} {row_name} {chosen.name}", flush=True)
            trainers[row_name] = build_training(config_path(dataset, row), opts, self.device)
            variants[row_name] = chosen.name
        if not trainers:
            print(f"[benchmark] --retime-training: no {dataset} row has chosen yet", flush=True)
            return None
        warmup, steps, rounds = (
            (1, 1, 2) if self.smoke else (TRAIN_WARMUP_STEPS, TRAIN_TIMED_STEPS, TRAIN_ROUNDS)
        )
        times = time_training_steps(trainers, warmup, steps, rounds, self.device)
        timing = {
            "date": now(),
            "machine": machine(self.device),
            "code": code_version(),
            "warmup_steps": warmup,
            "timed_steps": steps * rounds,
            "rows": {
                name: {
                    "variant": variants[name],
                    "train_s_per_iter": statistics.median(s),
                    # the spread of the timed steps, so that a reader sees what a ratio can bear
                    "train_s_per_iter_quartiles": quartiles(s),
                }
                for name, s in times.items()
            },
        }
        return self.write_timing(dataset, "train_timing.json", timing)

    # -- what is left
    def missing(self, dataset, row_names, sweep_only=False):
        """
        The runs still to train for ``row_names``, in the order the benchmark trains them, as
        ``(row, variant, seed)``. A variant that the sweep has not determined yet (the key's
        run at a best rate still unknown, or a row whose parent has not chosen) reads
        ``"<key>=<value> at the best lr"`` or ``"the chosen variant"``.
        """
        todo = []

        def add(row_name, variant, seed):
            if (row_name, variant, seed) not in todo:
                todo.append((row_name, variant, seed))

        def add_teacher(row, student, seed):
            t_chosen = self.chosen(dataset, row.teacher)
            if t_chosen is None or student is None:
                add(row.teacher, "the chosen variant", seed)
                return
            t_variant = self.teacher_variant(dataset, row, student, t_chosen).name
            if self.result(dataset, row.teacher, t_variant, seed) is None:
                add(row.teacher, t_variant, seed)
            elif not (
                self.run_dir(dataset, row.teacher, t_variant, seed) / "model_final.pth"
            ).is_file():
                # the student reads the checkpoint, which no sitting keeps: trained again
                add(row.teacher, t_variant + AGAIN, seed)

        def add_sweep(root):
            runs = self.sweep(dataset, root)
            for variant in runs:
                if self.result(dataset, root, variant.name, 0) is None:
                    add(root, variant.name, 0)
            key = ROWS[root].key
            if key is not None and not self.smoke and len(runs) == len(self.learning_rates):
                current = config_value(dataset, ROWS[root])
                for value in key.candidates:
                    if value != current:
                        add(root, f"{key.label}={value:g} at the best lr", 0)

        for row_name in row_names:
            row = ROWS[row_name]
            if dataset not in row.datasets:
                continue
            add_sweep(root_row(row_name))
            if sweep_only:
                continue
            if row.teacher is not None:
                add_sweep(row.teacher)
            chosen = self.chosen(dataset, row_name)
            for seed in self.seeds(row_name):
                if chosen is not None and self.result(dataset, row_name, chosen.name, seed):
                    continue  # done: its teacher is not needed again either
                if row.teacher is not None:  # trained first, with the student's seed
                    add_teacher(row, chosen, seed)
                add(row_name, "the chosen variant" if chosen is None else chosen.name, seed)
        return todo

    @staticmethod
    def step_seconds(all_runs, dataset, row_name):
        """
        The median seconds per step of the row's committed runs on ``dataset`` (``all_runs``:
        :func:`load_runs`), else its root detector's (a lower bound for a distilled row, which
        also runs its teacher), else the same on another dataset (images of similar size), with
        where it came from (the row, or "<dataset> <row>"); ``(None, None)`` when none ran.
        """
        others = [d for d in all_runs if d != dataset]
        for where in [dataset, *others]:
            for source in (row_name, root_row(row_name)):
                steps = [
                    result.get("train_s_per_iter")
                    for seeds in all_runs.get(where, {}).get(source, {}).values()
                    for result in seeds.values()
                ]
                steps = [s for s in steps if s]
                if steps:
                    return statistics.median(steps), (
                        source if where == dataset else f"{where} {source}"
                    )
        return None, None

    def print_plan(self, dataset, row_names, sweep_only=False):
        """Prints the runs still to train and their training steps' time; returns the runs."""
        todo = self.missing(dataset, row_names, sweep_only)
        committed = load_runs(self.results)
        total, unknown = 0.0, 0
        runs = "1 run" if len(todo) == 1 else f"{len(todo)} runs"
        print(f"[benchmark] {dataset}: {runs} to train", flush=True)
        for row_name, variant, seed in todo:
            step, source = self.step_seconds(committed, dataset, row_name)
            run_variant = variant.removesuffix(AGAIN)  # the folder of a teacher trained again
            done = self.steps_done(dataset, row_name, run_variant, seed)
            notes = [] if source in (row_name, None) else [f"from {source}'s s/iter"]
            if done and source != row_name:
                # a borrowed s/iter misjudges a row that runs more than its root (the separate
                # backbone, a student's teacher): the steps it has done measure the row itself
                metrics = self.run_dir(dataset, row_name, run_variant, seed) / "metrics.json"
                own = metrics.is_file() and read_metrics(metrics, 0)["train_s_per_iter"]
                if own:
                    step, notes = own, ["at its own s/iter so far"]
            if step is None:
                unknown += 1
                estimate = "? (no committed run of this detector on any dataset)"
            else:
                minutes = step * (self.max_iter(dataset) - done) / 60
                total += minutes
                notes += [f"resumes after step {done}"] if done else []
                estimate = f"~{minutes:.0f} min" + (f" ({'; '.join(notes)})" if notes else "")
            print(f"  {row_name:22} {variant:34} seed {seed}  {estimate}", flush=True)
        print(
            f"[benchmark] {dataset}: ~{total / 60:.1f} h of training steps at the committed"
            " s/iter or an interrupted run's own (evaluations and"
            f" {unknown} runs of unknown cost not counted)",
            flush=True,
        )
        return todo

    def run_row(self, dataset, row_name):
        if dataset not in ROWS[row_name].datasets:
            print(f"[benchmark] {row_name} does not run on {dataset}: skipped", flush=True)
            return
        variant = self.ensure_chosen(dataset, row_name)
        for seed in self.seeds(row_name):
            self.run(dataset, row_name, variant, seed)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds per row (default: the row's)"
    )
    parser.add_argument("--results", default=str(DEFAULT_RESULTS), help="run results (committed)")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="training folders")
    parser.add_argument("--max-iter", type=int, default=None, help="override every schedule")
    parser.add_argument("--eval-period", type=int, default=None, help="override every period")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--sweep-only",
        action="store_true",
        help="only the tuning sweeps (seed 0) of the rows' detectors, not their reported seeds",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"check the pipeline: {SMOKE_ITERS} iterations, lr {SMOKE_LR}, no key, tiny inputs",
    )
    parser.add_argument("--report", action="store_true", help="only assemble tables and plots")
    parser.add_argument(
        "--plan",
        action="store_true",
        help="only list the runs still to train for --dataset/--rows, with their time (an"
        " interrupted run that will resume: the steps it has left)",
    )
    parser.add_argument(
        "--pack",
        metavar="FILE",
        help="at the end, write every run result under --results into FILE (one file)",
    )
    parser.add_argument(
        "--unpack",
        metavar="FILE",
        help="only add the run results of a --pack FILE to --results (never replacing one)",
    )
    parser.add_argument(
        "--retime",
        action="store_true",
        help="time the chosen deploy models interleaved (checkpoints in --output), then report",
    )
    parser.add_argument(
        "--retime-training",
        action="store_true",
        help="time a training step of every chosen row interleaved (no checkpoint needed), then"
        " report",
    )
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    # the committed results: the README's and MODEL_ZOO's tables follow them
    args.default_results = Path(args.results).resolve() == DEFAULT_RESULTS.resolve()
    changed = args.max_iter or args.eval_period or args.smoke
    default_output = Path(args.output).resolve() == DEFAULT_OUTPUT.resolve()
    trains = not (args.report or args.unpack or args.plan)
    if changed and trains and (args.default_results or default_output):
        # the benchmark's own training folders would be emptied for the other schedule's runs
        parser.error(
            "--max-iter / --eval-period / --smoke change the schedule: give --results and"
            " --output other folders"
        )
    return args


def prepare_data(dataset):
    """Writes the dataset where its registered splits read it ($MIMICDET_DATASETS or
    datasets/); a no-op when it is there."""
    from mimicdet.data.deepforest import default_datasets_root

    data = default_datasets_root() / dataset
    # each tool waits for another process writing the same folder (a lane beside this one)
    for step in DATASETS[dataset].prepare:
        subprocess.run([sys.executable, step, "--output", str(data)], cwd=REPO, check=True)


def main(argv=None):
    args = parse_args(argv)
    import mimicdet  # noqa: F401 registers the datasets

    bench = Benchmark(
        args.results,
        args.output,
        args.device,
        args.max_iter,
        args.eval_period,
        args.seeds,
        args.smoke,
    )
    if args.plan:
        for dataset in args.dataset:
            bench.print_plan(dataset, args.rows, args.sweep_only)
        return
    if args.unpack:
        unpack_runs(args.unpack, args.results, benchmark_schedule=args.default_results)
    elif args.retime:
        for dataset in args.dataset:
            bench.retime(dataset)
    elif args.retime_training:
        timed = []
        for dataset in args.dataset:
            prepare_data(dataset)
            timed.append(bench.retime_training(dataset))
        if not any(timed):
            raise SystemExit("--retime-training: no row of --dataset has a chosen variant yet")
    elif not args.report:
        for dataset in args.dataset:
            prepare_data(dataset)
            for row_name in args.rows:
                if args.sweep_only:
                    bench.ensure_chosen(dataset, row_name)
                else:
                    bench.run_row(dataset, row_name)
    # the README's headline table follows the committed results, not a smoke run's
    write_report(
        args.results,
        readme=REPO / "README.md" if args.default_results else None,
        model_zoo=REPO / "MODEL_ZOO.md" if args.default_results else None,
        # the committed results report the benchmark's schedules whatever the flags say
        max_iters=None if args.default_results else bench.schedules(),
    )
    if args.pack:
        pack_runs(args.results, args.pack)


if __name__ == "__main__":
    # SIGUSR1 asks train_net.py for a checkpoint (CheckpointOnSignal); sent to a lane's process
    # group it must not kill this process, which supervises the training (the trainings inherit
    # the ignored signal and handle it themselves)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    main()
