#!/usr/bin/env python
"""
Does a deploy model's inference time depend on its trained weights? The benchmark's tables time
one deploy *network* as one, pooling the runs of MimicDet and its ablations, and of RetinaNet and
its distilled students (``benchmark_report.normalize_inference``); this check measures what that
assumes.

    python tools/timing_weights_check.py --output /root/bench/output --dataset deepforest

Every checkpoint of a chosen variant still in ``--output`` is timed twice, its deploy model at
its own weights and the same network at its config's initial weights, with the yardstick, all
interleaved image by image in one process (``benchmark.time_images``), so that machine load
cancels; run it with nothing else training (the lanes paused). A network's cost can depend on
its weights only after its convolutions, in how many candidates pass its score threshold into
box decoding and NMS; so the detections per image are counted too. Writes
``<results>/runs/<dataset>/weights_timing.json`` and prints it.
"""

import argparse
import shlex
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import benchmark  # noqa: E402
from benchmark_rows import DATASETS, ROWS  # noqa: E402


def checkpoints(bench, dataset):
    """(row, variant, seed, run folder) of every seed of a chosen variant (the tuning run's and
    any beyond the reported ones too: one network either way) whose final checkpoint is in the
    benchmark's output and is the one its committed result names (by digest): a folder left
    from an earlier config would time another network."""
    found = []
    for row_name, row in ROWS.items():
        chosen = bench.chosen(dataset, row_name)
        if chosen is None or dataset not in row.datasets:
            continue
        folders = bench.run_dir(dataset, row_name, chosen.name, 0).parent
        for final in sorted(folders.glob(f"{chosen.name}-seed*/model_final.pth")):
            seed = final.parent.name.removeprefix(f"{chosen.name}-seed")
            if not seed.isdigit():  # a copy beside the runs (lr0.005-seed1.bak): no run's
                print(f"[timing] {final}: not in a run's folder, left out")
                continue
            seed = int(seed)
            result = bench.result(dataset, row_name, chosen.name, seed) or {}
            if (result.get("sha256") or {}).get("model_final.pth") != benchmark.sha256(final):
                print(f"[timing] {final}: not the checkpoint of a committed result, left out")
                continue
            found.append((row_name, chosen, seed, final.parent))
    return found


def detections(predictor, images):
    """Mean detections per image of ``predictor`` (demo.Predictor: Instances per image)."""
    return statistics.mean(len(predictor(image)) for image in images)


def check(bench, dataset, command, rounds=2, count_images=5):
    """Times each checkpoint at its weights and at initial weights (see the module's doc);
    ``command`` is the command line that asked, for the record. None if there is none."""
    found = checkpoints(bench, dataset)
    if not found:
        return None
    models, runs = {"yardstick": benchmark.Yardstick(dataset, bench.device)}, {}
    for row_name, variant, seed, out in found:
        row = ROWS[row_name]
        config = benchmark.config_path(dataset, row)
        opts = benchmark.deploy_opts(row, variant.opts)
        name = f"{row_name}/{variant.name}-seed{seed}"
        trained = benchmark.deploy_weights(row, out)
        models[name] = benchmark.build_predictor(config, opts, trained, bench.device)
        models[name + "@initial"] = benchmark.build_predictor(config, opts, "", bench.device)
        runs[name] = {"checkpoint": str(trained)}
    images = benchmark.val_images(dataset, 1 if bench.smoke else None)
    times = benchmark.time_rounds(models, images, rounds, bench.device)
    yardstick = statistics.median(times["yardstick"])
    for name, run in runs.items():
        trained, initial = (statistics.median(times[n]) for n in (name, name + "@initial"))
        run.update(
            infer_ms=trained,
            infer_ms_initial_weights=initial,
            initial_over_trained=initial / trained,
            detections_per_image=detections(models[name], images[:count_images]),
            detections_per_image_initial_weights=detections(
                models[name + "@initial"], images[:count_images]
            ),
        )
    return {
        "command": command,
        "date": benchmark.now(),
        "machine": benchmark.machine(bench.device),
        "images": len(images),
        "rounds": rounds,
        "yardstick_ms": yardstick,
        "runs": runs,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--dataset", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--output", default="output/benchmark", help="the trainings' folders")
    parser.add_argument("--results", default=str(REPO / "benchmarks"), help="the committed runs")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--smoke", action="store_true",
        help="the runs of benchmark.py --smoke (tests): its one learning rate, one image timed",
    )  # fmt: skip
    parser.add_argument(
        "--max-iter", type=int, default=None, help="the runs' schedule, as given to benchmark.py"
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import mimicdet  # noqa: F401 registers the datasets

    bench = benchmark.Benchmark(
        args.results, args.output, args.device, args.max_iter, smoke=args.smoke
    )
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "tools/timing_weights_check.py", *given])
    checked = []
    for dataset in args.dataset:
        timing = check(bench, dataset, command)
        if timing is None:
            print(f"[timing] {dataset}: no checkpoint of a chosen variant in {bench.output}")
            continue
        checked.append(dataset)
        bench.write_timing(dataset, "weights_timing.json", timing)
        print(f"[timing] {dataset}: yardstick {timing['yardstick_ms']:.1f} ms")
        for name, run in timing["runs"].items():
            print(
                f"  {name}: {run['infer_ms']:.1f} ms trained, "
                f"{run['infer_ms_initial_weights']:.1f} at initial weights "
                f"({run['initial_over_trained'] - 1:+.1%}); detections per image "
                f"{run['detections_per_image']:.1f} and "
                f"{run['detections_per_image_initial_weights']:.1f}"
            )
    if not checked:
        raise SystemExit(
            f"no checkpoint of a chosen variant of {', '.join(args.dataset)} in {bench.output}:"
            " this check needs the trainings' model_final.pth (--output: where they trained)"
        )


if __name__ == "__main__":
    main()
