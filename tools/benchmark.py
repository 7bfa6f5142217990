#!/usr/bin/env python
"""
Train and evaluate MimicDet, MimicDet without mimicking, detectron2's RetinaNet and FCOS on
DeepForest in one run, with the same backbone, data and schedule, and measure each:

    AP, AP50          COCOEvaluator on deepforest_val at the end of training (train_net.py)
    train_s_per_iter  median of detectron2's "time" in metrics.json, after the warm-up iterations
    infer_ms          batch 1, warm, median over the val tiles (MimicDet: the deploy checkpoint)
    params, gflops    of the model inference runs (fvcore's FlopCountAnalysis on the eval-mode
                      model, one val tile; a fused multiply-add counts as one flop, as in fvcore)

    python tools/benchmark.py                      # the full run (about 4x `make demo`)
    python tools/benchmark.py --quick              # a few iterations, for a fast look
    python tools/benchmark.py --seeds 3            # 3 trainings per model (SEED 0, 1, 2): AP and
                                                   # AP50 are their means, each run is listed too

Writes <output>/results.json and <output>/results.md (default output/benchmark).
"""

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from convert_to_deploy import convert, training_only_keys  # noqa: E402
from demo import Predictor  # noqa: E402

MODELS = {
    "mimicdet": "configs/DeepForest/mimicdet_MNV2_FPN.yaml",
    "mimicdet_nomimic": "configs/DeepForest/mimicdet_MNV2_FPN_nomimic.yaml",
    "retinanet": "configs/DeepForest/retinanet_MNV2_FPN.yaml",
    "fcos": "configs/DeepForest/fcos_MNV2_FPN.py",
}
METRICS = ("AP", "AP50", "train_s_per_iter", "infer_ms", "params", "gflops")
QUICK_ITERS = 4


def overrides(config, output_dir, max_iter, seed=None):
    """
    train_net.py options: the output folder, the random seed if ``seed`` is given (else
    detectron2 draws one) and, if ``max_iter`` is given, a schedule shortened in proportion
    (warm-up and LR steps scale with it; the LazyConfig scheduler is already expressed in
    fractions of ``train.max_iter``), the same for every model.
    """
    if config.endswith(".py"):
        opts = [f"train.output_dir={output_dir}"]
        opts += [f"train.seed={seed}"] if seed is not None else []
        return opts + ([f"train.max_iter={max_iter}"] if max_iter else [])
    opts = ["OUTPUT_DIR", str(output_dir)]
    opts += ["SEED", str(seed)] if seed is not None else []
    if max_iter:
        from detectron2.config import get_cfg

        from mimicdet import add_mimicdet_config

        cfg = get_cfg()
        add_mimicdet_config(cfg)
        cfg.merge_from_file(str(REPO / config))
        scale = max_iter / cfg.SOLVER.MAX_ITER
        steps = {round(s * scale) for s in cfg.SOLVER.STEPS} & set(range(1, max_iter))
        steps = tuple(sorted(steps))
        warmup = max(1, round(cfg.SOLVER.WARMUP_ITERS * scale))
        opts += ["SOLVER.MAX_ITER", str(max_iter), "SOLVER.STEPS", str(steps)]
        opts += ["SOLVER.WARMUP_ITERS", str(warmup)]
    return opts


def read_training_metrics(metrics_file, warmup_iters):
    """AP, AP50 (last bbox/* values) and the median seconds per iteration after ``warmup_iters``
    from detectron2's metrics.json (one JSON record per line)."""
    records = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line]
    times = [r["time"] for r in records if "time" in r and r.get("iteration", 0) >= warmup_iters]
    if not times:  # a run shorter than the warm-up
        times = [r["time"] for r in records if "time" in r]
    ap = {k: v for r in records for k, v in r.items() if k.startswith("bbox/")}
    return {
        "AP": ap.get("bbox/AP"),
        "AP50": ap.get("bbox/AP50"),
        "train_s_per_iter": statistics.median(times) if times else None,
    }


def combine_runs(runs):
    """
    One model's row from the training metrics of its runs (one per seed): the mean AP and AP50,
    each run's in ``AP_runs`` / ``AP50_runs``, and the median of the runs' step times.
    """
    if len(runs) == 1:
        return runs[0]
    row = {}
    for key in ("AP", "AP50"):
        values = [r[key] for r in runs]
        row[f"{key}_runs"] = values
        known = [v for v in values if v is not None and v == v]  # COCOeval's nan: no detections
        row[key] = statistics.mean(known) if known else None
    times = [r["train_s_per_iter"] for r in runs if r["train_s_per_iter"] is not None]
    row["train_s_per_iter"] = statistics.median(times) if times else None
    return row


def run_dir(output, name, seed):
    """A training's folder: ``<output>/<model>``, or ``<output>/<model>/seed<k>`` with seeds."""
    return output / name if seed is None else output / name / f"seed{seed}"


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


def measure_inference(config, weights, images, warmup=2):
    """Median ms per image (batch 1, after ``warmup`` untimed images), params and GFLOPs."""
    predictor = Predictor(REPO / config, ["MODEL.WEIGHTS", str(weights)])
    for image in images[:warmup]:
        predictor(image)
    times = []
    for image in images:
        start = time.perf_counter()
        predictor(image)
        times.append((time.perf_counter() - start) * 1000)
    model = predictor.model
    skip = training_only_keys(dict(model.named_parameters())) if "mimicdet" in config else ()
    resized = predictor.aug.get_transform(images[0]).apply_image(images[0])
    image = resized[:, :, ::-1] if predictor.input_format == "RGB" else resized
    params, gflops = inference_cost(model, image.copy(), skip)
    return statistics.median(times), params, gflops


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU"


def write_results(results, output_dir):
    """Writes results.json and results.md (a table, ratios against RetinaNet) into output_dir."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # COCOeval gives nan for a model with no detections; JSON has no nan, so it becomes null
    results = json.loads(json.dumps(results), parse_constant=lambda constant: None)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (output_dir / "results.md").write_text(markdown_table(results))


def _fmt(value, digits):
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_runs(values):
    return ", ".join(_fmt(v, 1) for v in values)


def markdown_table(results):
    models = results["models"]
    base = models.get("retinanet", {})

    def ratio(name, key):
        a, b = models[name].get(key), base.get(key)
        return "n/a" if a is None or not b else f"{a / b:.2f}x"

    lines = [
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}  ",
        f"Machine: {results['machine']}",
        "",
        "| model | AP | AP50 | train s/iter | infer ms/img | params (M) | GFLOPs "
        "| train vs RetinaNet | infer vs RetinaNet |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in models.items():
        params = None if m.get("params") is None else m["params"] / 1e6
        lines.append(
            f"| {name} | {_fmt(m.get('AP'), 1)} | {_fmt(m.get('AP50'), 1)} "
            f"| {_fmt(m.get('train_s_per_iter'), 2)} | {_fmt(m.get('infer_ms'), 0)} "
            f"| {_fmt(params, 2)} | {_fmt(m.get('gflops'), 1)} "
            f"| {ratio(name, 'train_s_per_iter')} | {ratio(name, 'infer_ms')} |"
        )
    with_runs = [name for name, m in models.items() if "AP_runs" in m]
    if with_runs:
        lines += ["", "AP and AP50 above are means over seeds; each run:", ""]
        lines += ["| model | AP per run | AP50 per run |", "|---|---|---|"]
        for name in with_runs:
            ap, ap50 = (_fmt_runs(models[name][k]) for k in ("AP_runs", "AP50_runs"))
            lines.append(f"| {name} | {ap} | {ap50} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="output/benchmark", help="output folder")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ITERS} iterations per model")
    parser.add_argument("--max-iter", type=int, default=None, help="override the iteration count")
    parser.add_argument(
        "--reuse", action="store_true", help="keep trainings already finished in --output"
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--seeds", type=int, default=1, help="trainings per model; above 1, seeded 0..N-1"
    )
    parser.add_argument(
        "--warmup-iters", type=int, default=50, help="iterations left out of train_s_per_iter"
    )
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    max_iter = args.max_iter or (QUICK_ITERS if args.quick else None)
    # a shortened schedule shortens the warm-up left out of the timing as well
    warmup = args.warmup_iters if not max_iter else min(args.warmup_iters, max_iter // 4)
    output = Path(args.output).resolve()
    command = "python tools/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])

    import mimicdet  # noqa: F401 registers the datasets
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image

    subprocess.run([sys.executable, "tools/prepare_deepforest.py"], cwd=REPO, check=True)
    results = {"models": {}}

    def context():
        return {
            "command": command,
            "machine": machine(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        }

    # one run keeps detectron2's random seed and the output layout of earlier runs
    seeds = [None] if args.seeds == 1 else list(range(args.seeds))
    for name in args.models:
        config, runs = MODELS[name], []
        for seed in seeds:
            out = run_dir(output, name, seed)
            if args.reuse and (out / "model_final.pth").is_file():
                print(f"[benchmark] reusing the finished training in {out}", flush=True)
            else:
                print(f"[benchmark] training {name} ({config}) -> {out}", flush=True)
                train = [sys.executable, "train_net.py", "--config-file", config]
                subprocess.run(train + overrides(config, out, max_iter, seed), cwd=REPO, check=True)
            runs.append(read_training_metrics(out / "metrics.json", warmup))
            results["models"][name] = combine_runs(runs)
            write_results(dict(results, **context()), output)  # partial results survive a stop

    records = DatasetCatalog.get("deepforest_val")
    images = [read_image(r["file_name"], format="BGR") for r in records]
    if args.quick:
        images = images[:4]
    for name in args.models:
        # the first seed's checkpoint is timed: speed does not depend on the seed
        config, out = MODELS[name], run_dir(output, name, seeds[0])
        weights = out / "model_final.pth"
        if "mimicdet" in name:
            weights = out / "model_deploy.pth"
            convert(str(out / "model_final.pth"), str(weights))
        print(f"[benchmark] timing {name} on {len(images)} val tiles ({weights})", flush=True)
        infer_ms, params, gflops = measure_inference(config, weights, images)
        results["models"][name].update(infer_ms=infer_ms, params=params, gflops=gflops)
        write_results(dict(results, **context()), output)

    results.update(context())
    write_results(results, output)
    print(markdown_table(results), flush=True)
    print(f"[benchmark] wrote {output / 'results.json'} and {output / 'results.md'}")


if __name__ == "__main__":
    main()
