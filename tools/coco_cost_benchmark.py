#!/usr/bin/env python
"""
MimicDet's cost at COCO scale beside detectron2's RetinaNet and FCOS, all R-50 FPN with random
weights, on 800x1333 images with COCO-like boxes (mimicdet.data.synthetic_coco):

- inference of MimicDet's deploy model (no T-head, no P2) against RetinaNet and FCOS: backbone
  (ResNet + FPN), heads, post-processing (decoding, thresholds, NMS) and total, per image;
- a training step (forward + backward, MimicDet with its T-head), and peak memory.

    python tools/coco_cost_benchmark.py                       # CPU, 2 threads, batch 1
    python tools/coco_cost_benchmark.py --device cuda --amp --batch 2 --json out.json

Fair by construction: the three models run interleaved in one process, in an order rotated each
repeat (A B C, B C A, C A B, ...), each time is the median of --repeat runs, and the table gives
ratios to RetinaNet.

Two things make random weights unrepresentative, and both are corrected the same way for every
model (each says so in the JSON):
- Features. With detectron2's FrozenBN at its initial statistics (mean 0, var 1) a random R-50's
  activations grow stage after stage (FPN levels near 2000 in magnitude): a single-conv head then
  gives logits in the hundreds, whose BCE gradients underflow into denormal floats that make the
  CPU's convolution backward 40x slower. Before timing, each FrozenBN gets the mean and variance
  of its input on the first image (one pass, in order), as a trained network's BN would hold,
  so every stage's output has unit scale.
- Candidates. Random classifiers put every score above the test thresholds (MimicDet keeps all
  80 classes of 1000 boxes), so post-processing would sort and NMS far more boxes than a trained
  model does. Each model's test score threshold is set, on the first image, to the score of its
  --candidates-th best candidate, so that every model sends the same number of boxes to NMS.
Peak memory: CPU, the peak RSS of a separate process running that model alone (inference or
one training step); CUDA, torch.cuda.max_memory_allocated around that model's runs.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

from convert_to_deploy import training_only_keys  # noqa: E402

MODELS = ("mimicdet", "retinanet", "fcos")
MIMICDET_CONFIG = os.path.join(REPO, "configs", "COCO-Detection", "mimicdet_R_50_FPN_1x.yaml")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.strip().splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", action="store_true", help="float16 autocast (CUDA) + GradScaler")
    parser.add_argument("--batch", type=int, default=1, help="images per step (default 1)")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--boxes-per-image", type=int, default=7, help="COCO's mean is about 7")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per model (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    parser.add_argument(
        "--candidates", type=int, default=1000, help="boxes per image sent to NMS (see above)"
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--skip-memory", action="store_true", help="no peak-memory runs")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="only profile one training step per model, and count denormal gradients",
    )
    parser.add_argument(
        "--by-shape", action="store_true", help="with --profile: one row per op and input shape"
    )
    parser.add_argument(
        "--no-bn-calibration",
        action="store_true",
        help="keep FrozenBN at mean 0 / var 1 (what made the CPU backward slow, see above)",
    )
    parser.add_argument(
        "--memory-probe", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.amp and args.device != "cuda":
        parser.error("--amp is float16 autocast, for --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    return args


def build_cfg(name, args):
    """The detectron2 config of ``name`` (R-50 FPN, COCO 1x) with random weights."""
    from detectron2 import model_zoo
    from detectron2.config import LazyConfig, get_cfg

    if name == "fcos":
        from mimicdet.modeling import Float32BoxFCOS

        cfg = LazyConfig.load(model_zoo.get_config_file("COCO-Detection/fcos_R_50_FPN_1x.py"))
        # as the project's FCOS configs: detectron2's FCOS, which fails with --amp, with its box
        # outputs decoded in float32 (identical in float32)
        cfg.model._target_ = Float32BoxFCOS
        # v0.6's head probes get_norm(norm, 1), which GroupNorm(32, 1) refuses on current torch
        cfg.model.head.norm = _group_norm
        return cfg
    if name == "mimicdet":
        from mimicdet import get_mimicdet_cfg

        cfg = get_mimicdet_cfg(MIMICDET_CONFIG)
    else:
        cfg = get_cfg()
        cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = args.device
    return cfg


def _group_norm(channels):
    """detectron2's "GN" (32 groups), with one group for the probe above."""
    return torch.nn.GroupNorm(min(32, channels), channels)


def build(name, args):
    from detectron2.config import instantiate
    from detectron2.modeling import build_model

    cfg = build_cfg(name, args)
    torch.manual_seed(0)
    model = instantiate(cfg.model) if name == "fcos" else build_model(cfg)
    return model.to(args.device)


def make_batch(args, seed=0):
    """``args.batch`` noise images with COCO-like boxes, in DatasetMapper's output format."""
    from detectron2.structures import Boxes, Instances

    from mimicdet.data.synthetic_coco import coco_like_boxes

    rng = np.random.RandomState(seed)
    batch = []
    for i in range(args.batch):
        size = (args.height, args.width)
        boxes = torch.as_tensor(coco_like_boxes(args.boxes_per_image, size, seed=seed + i))
        instances = Instances(size, gt_boxes=Boxes(boxes))
        instances.gt_classes = torch.as_tensor(rng.randint(0, 80, len(boxes)))
        image = torch.as_tensor(rng.randint(0, 256, (3, *size)).astype("float32"))
        batch.append({"image": image, "instances": instances, "height": size[0], "width": size[1]})
    return batch


@torch.no_grad()
def calibrate_frozen_bn(model, batch):
    """Give each FrozenBN its input's per-channel mean and variance (see the module docstring)."""
    from detectron2.layers import FrozenBatchNorm2d

    def set_stats(module, inputs):
        x = inputs[0].float()
        module.running_mean.copy_(x.mean((0, 2, 3)))
        module.running_var.copy_(x.var((0, 2, 3)) + module.eps)

    hooks = [
        m.register_forward_pre_hook(set_stats)
        for m in model.modules()
        if isinstance(m, FrozenBatchNorm2d)
    ]
    model.eval()
    try:
        model([{"image": x["image"]} for x in batch[:1]])
    finally:
        for hook in hooks:
            hook.remove()
    return len(hooks)


@contextmanager
def recording_nms_inputs(scores_seen):
    """Collects the scores every detector sends to detectron2's batched_nms."""
    import detectron2.modeling.meta_arch.fcos as fcos
    import detectron2.modeling.meta_arch.retinanet as retinanet

    import mimicdet.modeling.meta_arch as mimicdet_arch

    modules = (fcos, retinanet, mimicdet_arch)
    originals = [m.batched_nms for m in modules]

    def recorder(original):
        def nms(boxes, scores, idxs, iou_threshold):
            scores_seen.append(scores.detach().float().cpu())
            return original(boxes, scores, idxs, iou_threshold)

        return nms

    for module, original in zip(modules, originals):
        module.batched_nms = recorder(original)
    try:
        yield
    finally:
        for module, original in zip(modules, originals):
            module.batched_nms = original


@torch.no_grad()
def calibrate_candidates(model, batch, candidates):
    """Sets the test score threshold so that ``candidates`` boxes per image reach NMS (the
    attribute is ``test_score_thresh`` in all three detectors)."""
    model.test_score_thresh = 0.0
    scores = []
    with recording_nms_inputs(scores):
        model([{"image": batch[0]["image"]}])
    scores = torch.cat(scores)
    if len(scores) <= candidates:
        return {"threshold": 0.0, "candidates": len(scores)}
    threshold = scores.topk(candidates + 1).values[-1].item()
    model.test_score_thresh = threshold
    kept = []
    with recording_nms_inputs(kept):
        model([{"image": batch[0]["image"]}])
    return {"threshold": threshold, "candidates": int(sum(len(s) for s in kept))}


class StageTimer:
    """Wall time at which the backbone and the heads finish. MimicDet's heads end with the S-head
    read at the top refined boxes (``SHead.forward_at``, after the refinement and its top-k);
    detectron2's dense detectors' with their head module's forward."""

    def __init__(self, model, name, sync):
        self.sync = sync
        self.marks = {}
        self.hooks = [model.backbone.register_forward_hook(self._mark("backbone"))]
        self.restore = lambda: None
        if name == "mimicdet":
            s_head, forward_at = model.s_head, model.s_head.forward_at

            def timed_forward_at(*args, **kwargs):
                out = forward_at(*args, **kwargs)
                self._mark("heads")()
                return out

            s_head.forward_at = timed_forward_at
            self.restore = lambda: delattr(s_head, "forward_at")
        else:
            self.hooks.append(model.head.register_forward_hook(self._mark("heads")))

    def _mark(self, key):
        def hook(*_):
            self.sync()
            self.marks[key] = time.perf_counter()

        return hook

    def remove(self):
        for hook in self.hooks:
            hook.remove()
        self.restore()


def amp_context(args):
    """float16 autocast with --amp (CUDA), else nothing."""
    return torch.autocast("cuda", dtype=torch.float16) if args.amp else nullcontext()


def _sync_for(device):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def time_inference(name, model, batch, args):
    sync = _sync_for(args.device)
    images = [{"image": x["image"]} for x in batch]
    timer = StageTimer(model, name, sync)
    autocast = amp_context(args)
    try:
        with torch.no_grad(), autocast:
            sync()
            start = time.perf_counter()
            model(images)
            sync()
            end = time.perf_counter()
    finally:
        timer.remove()
    per_image = 1000.0 / len(images)
    return {
        "backbone_ms": (timer.marks["backbone"] - start) * per_image,
        "heads_ms": (timer.marks["heads"] - timer.marks["backbone"]) * per_image,
        "postprocess_ms": (end - timer.marks["heads"]) * per_image,
        "total_ms": (end - start) * per_image,
    }


def train_step(model, batch, args, scaler):
    from detectron2.utils.events import EventStorage

    sync = _sync_for(args.device)
    model.train()
    autocast = amp_context(args)
    with EventStorage():
        sync()
        start = time.perf_counter()
        with autocast:
            losses = model(batch)
        loss = sum(losses.values())
        (scaler.scale(loss) if scaler else loss).backward()
        sync()
        end = time.perf_counter()
    model.zero_grad(set_to_none=True)
    model.eval()
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite training loss {loss.item()}: {losses}")
    return (end - start) * 1000.0


def profile_train_steps(args, rows=15):
    """The operators taking the most time in one training step (after a warm-up step)."""
    from torch.profiler import ProfilerActivity, profile

    batch = make_batch(args)
    scaler = torch.amp.GradScaler("cuda") if args.amp else None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    for name in args.models:
        model, _ = prepare(name, args, batch)
        train_step(model, batch, args, scaler)
        with profile(
            activities=activities, record_shapes=args.by_shape
        ) as prof, counting_denormal_gradients(model) as found:
            step_ms = train_step(model, batch, args, scaler)
        averages = prof.key_averages(group_by_input_shape=args.by_shape)
        events = sorted(averages, key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        print(f"{name}: training step {step_ms:.0f} ms under the profiler; self CPU time by op:")
        for e in events[:rows]:
            ms, share = e.self_cpu_time_total / 1e3, 100 * e.self_cpu_time_total / total
            shapes = f"  {str(e.input_shapes)[:70]}" if args.by_shape else ""
            print(f"  {e.key[:48]:48s} {ms:8.0f} ms {share:5.1f}%  x{e.count}{shapes}")
        print(f"{name}: denormal values in the gradients of module outputs: {sum(found.values())}")
        for module, count in sorted(found.items(), key=lambda kv: -kv[1])[:5]:
            print(f"  {module}: {count}")


@contextmanager
def counting_denormal_gradients(model):
    """Counts float32 gradient values below the smallest normal float (1.2e-38) reaching each
    leaf module's output; the CPU's arithmetic on such values is many times slower."""
    tiny = torch.finfo(torch.float32).tiny
    found = {}

    def watch(name):
        def count(grad):
            magnitude = grad.detach().abs()
            n = int(((magnitude > 0) & (magnitude < tiny)).sum())
            if n:
                found[name] = found.get(name, 0) + n

        def hook(module, inputs, output):
            outputs = output if isinstance(output, (list, tuple)) else [output]
            for out in outputs:
                if (
                    isinstance(out, torch.Tensor)
                    and out.requires_grad
                    and out.dtype == torch.float32
                ):
                    out.register_hook(count)

        return hook

    hooks = [
        m.register_forward_hook(watch(n))
        for n, m in model.named_modules()
        if not list(m.children())
    ]
    try:
        yield found
    finally:
        for hook in hooks:
            hook.remove()


def deploy_params(name, model):
    """Parameters of what inference loads: MimicDet's deploy checkpoint drops the T-head and
    the P2 convs (tools/convert_to_deploy.py)."""
    state = model.state_dict()
    dropped = set(training_only_keys(state)) if name == "mimicdet" else set()
    params = {n for n, _ in model.named_parameters()}
    return sum(t.numel() for n, t in state.items() if n in params and n not in dropped)


def prepare(name, args, batch):
    model = build(name, args)
    info = {
        "params_m": deploy_params(name, model) / 1e6,
        "train_params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }
    model.eval()
    info["frozen_bn_calibrated"] = (
        0 if args.no_bn_calibration else calibrate_frozen_bn(model, batch)
    )
    info.update(calibrate_candidates(model, batch, args.candidates))
    return model.eval(), info


def memory_probe(name, mode, args):
    """Run in a child process: one model, one inference (or training step); print peak RSS."""
    batch = make_batch(args)
    model, _ = prepare(name, args, batch)
    if mode == "inference":
        time_inference(name, model, batch, args)
    else:
        train_step(model, batch, args, None)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb():
    """This process's peak resident memory. Not getrusage's ru_maxrss: on Linux a child started
    by fork + exec inherits its parent's maximum there, whereas VmHWM starts afresh at exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak RSS needs Linux")


def cpu_peak_rss(name, mode, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe", name, mode]
    cmd += ["--device", args.device, "--batch", str(args.batch), "--threads", str(args.threads)]
    cmd += ["--height", str(args.height), "--width", str(args.width)]
    cmd += ["--boxes-per-image", str(args.boxes_per_image), "--candidates", str(args.candidates)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]


def run(args):
    batch = make_batch(args)
    models, info = {}, {}
    for name in args.models:
        models[name], info[name] = prepare(name, args, batch)
        print(f"[coco_cost] built {name}: {info[name]}", flush=True)
    scaler = torch.amp.GradScaler("cuda") if args.amp else None
    runs = {name: {"inference": [], "train_ms": []} for name in args.models}
    for name, model in models.items():  # warm-up: allocator, kernels, caches
        if not args.skip_inference:
            time_inference(name, model, batch, args)
        if not args.skip_train:
            train_step(model, batch, args, scaler)
    names = list(models)
    for rep in range(args.repeat):
        # rotate the order each repeat: no model always runs first (on a cold cache)
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            model = models[name]
            if not args.skip_inference:
                runs[name]["inference"].append(time_inference(name, model, batch, args))
            if not args.skip_train:
                runs[name]["train_ms"].append(train_step(model, batch, args, scaler))
        print(f"[coco_cost] repeat {rep + 1}/{args.repeat} done", flush=True)

    results = {}
    for name in args.models:
        row = dict(info[name])
        if runs[name]["inference"]:
            for key in runs[name]["inference"][0]:
                row[key] = statistics.median(r[key] for r in runs[name]["inference"])
        if runs[name]["train_ms"]:
            row["train_step_ms"] = statistics.median(runs[name]["train_ms"])
        results[name] = row
    if not args.skip_memory:
        add_peak_memory(results, models, batch, args, scaler)
    return results


def add_peak_memory(results, models, batch, args, scaler):
    modes = (("inference", args.skip_inference), ("train", args.skip_train))
    for name, model in models.items():
        for mode in [m for m, skip in modes if not skip]:
            if args.device == "cpu":
                results[name][f"peak_{mode}_mb"] = cpu_peak_rss(name, mode, args)
                continue
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            if mode == "inference":
                time_inference(name, model, batch, args)
            else:
                train_step(model, batch, args, scaler)
            results[name][f"peak_{mode}_mb"] = torch.cuda.max_memory_allocated() / 2**20


def ratios(results, reference="retinanet"):
    if reference not in results:
        return {}
    ref = results[reference]
    keys = ("backbone_ms", "heads_ms", "postprocess_ms", "total_ms", "train_step_ms")
    return {
        name: {k: row[k] / ref[k] for k in keys if k in row and ref.get(k)}
        for name, row in results.items()
    }


def markdown(results, rel):
    cols = [
        ("backbone_ms", "backbone ms"),
        ("heads_ms", "heads ms"),
        ("postprocess_ms", "post-proc. ms"),
        ("total_ms", "inference ms"),
        ("train_step_ms", "train step ms"),
        ("peak_inference_mb", "peak MB (inf.)"),
        ("peak_train_mb", "peak MB (train)"),
        ("params_m", "params (M)"),
    ]
    cols = [(k, title) for k, title in cols if any(k in row for row in results.values())]
    lines = ["| model | " + " | ".join(t for _, t in cols) + " |"]
    lines.append("|---" * (len(cols) + 1) + "|")
    for name, row in results.items():
        cells = []
        for key, _ in cols:
            value = row.get(key)
            text = "" if value is None else f"{value:.0f}" if key != "params_m" else f"{value:.1f}"
            if key in rel.get(name, {}) and name != "retinanet":
                text += f" ({rel[name][key]:.2f}x)"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(*args.memory_probe, args)
        return
    if args.profile:
        profile_train_steps(args)
        return
    started = time.time()
    results = run(args)
    rel = ratios(results)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "memory_probe")},
        "torch": torch.__version__,
        "device_name": (
            torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{args.threads}"
        ),
        "results": results,
        "ratio_to_retinanet": rel,
        "seconds": round(time.time() - started, 1),
    }
    print(markdown(results, rel))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"[coco_cost] wrote {args.json}")


if __name__ == "__main__":
    main()
