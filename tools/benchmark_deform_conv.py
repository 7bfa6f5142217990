#!/usr/bin/env python
"""Times mimicdet's deform_conv2d against dense conv2d and torchvision's deform_conv2d.

Runs MimicDet's S-head shapes (N=2, C_in=C_out=256, padding k//2, random offsets with std 2)
and prints a markdown table of the time of each op and its ratio to dense conv2d. On the CPU the
time is the best of --repeat runs; on CUDA it is the median of --repeat runs timed with CUDA
events, after --warmup untimed runs of every step.

    python tools/benchmark_deform_conv.py                     # CPU, 2 threads, 3 repeats
    python tools/benchmark_deform_conv.py --quick             # one small shape, 1 repeat
    python tools/benchmark_deform_conv.py --device cuda --dtype float32 float16 --json out.json
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

from mimicdet.layers import deform_conv2d

# (kernel, H, W) of the S-head feature maps
SHAPES = [(5, 50, 84), (5, 25, 42), (3, 100, 167)]
QUICK_SHAPES = [(3, 25, 42)]
# Must match kColumnChunkBytes in csrc/guided_deform_conv_cpu.cpp.
CPU_COLUMN_BLOCK_BYTES = 16 << 20
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# CUDA kernels take microseconds, so a median over many runs is cheap and steadier than a min.
DEFAULT_REPEAT = {"cpu": 3, "cuda": 50}
PHASES = ("fwd", "fwd+bwd")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeat", type=int, help="runs per measurement (CPU: min of 3; CUDA: median of 50)"
    )
    parser.add_argument(
        "--baseline-repeat", type=int, default=1, help="CPU runs of torchvision's slow fwd+bwd"
    )
    parser.add_argument("--warmup", type=int, default=5, help="CUDA untimed runs of each step")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--dtype", nargs="+", default=["float32"], choices=list(DTYPES), help="one or more"
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="one small shape, 1 repeat")
    parser.add_argument("--skip-torchvision", action="store_true")
    parser.add_argument("--json", type=Path, help="also write every measurement to this file")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to torch")
    if args.repeat is None:
        args.repeat = DEFAULT_REPEAT[args.device]
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def make_case(batch, channels, kernel, height, width, device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, height, width, generator=gen)
    weight = torch.randn(channels, channels, kernel, kernel, generator=gen) * 0.01
    bias = torch.randn(channels, generator=gen)
    offset = torch.randn(batch, 2 * kernel * kernel, height, width, generator=gen) * 2
    return [t.to(device, dtype).requires_grad_() for t in (x, offset, weight, bias)]


def make_steps(x, offset, weight, bias, pad):
    """name -> (forward-only step, forward+backward step computing every input's gradient)."""
    forwards = {
        "conv2d": (lambda: F.conv2d(x, weight, bias, padding=pad), (x, weight, bias)),
        "mimicdet": (lambda: deform_conv2d(x, offset, weight, bias, padding=pad), None),
        "torchvision": (
            lambda: torchvision.ops.deform_conv2d(x, offset, weight, bias, padding=pad),
            None,
        ),
    }
    steps = {}
    for name, (forward, inputs) in forwards.items():
        inputs = inputs or (x, offset, weight, bias)

        def no_grad_step(forward=forward):
            with torch.no_grad():
                forward()

        def grad_step(forward=forward, inputs=inputs):
            out = forward()
            torch.autograd.grad(out, inputs, torch.ones_like(out))

        steps[name] = (no_grad_step, grad_step)
    return steps


def timed_ms(fn, device):
    if device == "cuda":
        # Events time the GPU's work between the two records; the queue is empty at the start
        # because the previous measurement waited for its end event.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def cpu_extra_memory_mib(batch, channels, kernel, height, width, element=4):
    """Upper bound of the op's CPU scratch memory (fwd, bwd): zero-bordered channels-last copy of
    the batch, the column blocks, and in backward one image's gradient and grad_weight."""
    padded_batch = batch * (height + 2) * (width + 2) * channels * element
    grad_weight = channels * channels * kernel * kernel * element
    forward = padded_batch + CPU_COLUMN_BLOCK_BYTES
    backward = padded_batch + padded_batch // batch + CPU_COLUMN_BLOCK_BYTES + grad_weight
    return forward / 2**20, backward / 2**20


def measure(args, names, steps, repeat, baseline_repeat):
    """Returns ({(name, phase): ms}, {name: error}) for one shape and dtype."""
    errors = {}
    for name in names:  # warm-up (allocator, one-time dispatch); an unsupported dtype fails here
        try:
            if args.device == "cuda":
                for _ in range(args.warmup):
                    for step in steps[name]:
                        step()
                torch.cuda.synchronize()
            else:
                steps[name][0]()
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    timings = {}
    # Interleaved rounds, so load from other processes hits every candidate alike.
    for round_index in range(repeat):
        for name in names:
            if name in errors:
                continue
            for phase, step in zip(PHASES, steps[name]):
                slow_baseline = phase == "fwd+bwd" and name == "torchvision"
                if args.device == "cpu" and slow_baseline and round_index >= baseline_repeat:
                    continue
                timings.setdefault((name, phase), []).append(timed_ms(step, args.device))
    # The CPU keeps its historical best-of-N; CUDA reports the median.
    reduce = statistics.median if args.device == "cuda" else min
    return {key: reduce(values) for key, values in timings.items()}, errors


def ratio(value, base):
    return None if value is None or base is None else value / base


def json_rows(shape, dtype_name, names, best, errors):
    kernel, height, width = shape
    rows = []
    for name in names:
        fwd, fwd_bwd = best.get((name, "fwd")), best.get((name, "fwd+bwd"))
        rows.append(
            {
                "shape": f"{kernel}x{kernel} @ {height}x{width}",
                "kernel": kernel,
                "height": height,
                "width": width,
                "dtype": dtype_name,
                "op": name,
                "fwd_ms": fwd,
                "fwd_bwd_ms": fwd_bwd,
                "fwd_vs_torchvision": ratio(fwd, best.get(("torchvision", "fwd"))),
                "fwd_bwd_vs_torchvision": ratio(fwd_bwd, best.get(("torchvision", "fwd+bwd"))),
                "fwd_vs_conv2d": ratio(fwd, best.get(("conv2d", "fwd"))),
                "fwd_bwd_vs_conv2d": ratio(fwd_bwd, best.get(("conv2d", "fwd+bwd"))),
                "error": errors.get(name),
            }
        )
    return rows


def cell(value, base):
    if value is None:
        return " n/a |"
    return f" {value:.1f} ({value / base:.2f}x) |" if base else f" {value:.1f} |"


def main():
    args = parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeat = 1 if args.quick else args.repeat
    baseline_repeat = min(repeat, args.baseline_repeat)
    names = ["conv2d", "mimicdet"] + ([] if args.skip_torchvision else ["torchvision"])
    # The dtype column appears only when asked for, so the default table reads as it always did.
    show_dtype = args.dtype != ["float32"]
    statistic = "median" if args.device == "cuda" else "min"
    baseline_note = "" if args.device == "cuda" else f" (torchvision fwd+bwd: {baseline_repeat})"
    print(
        f"device={args.device} threads={torch.get_num_threads()} repeat={repeat}"
        f"{baseline_note} N={args.batch} C_in=C_out={args.channels}"
        + (f" statistic={statistic} warmup={args.warmup}\n" if args.device == "cuda" else "\n")
    )
    header = "| shape |" + (" dtype |" if show_dtype else "") + " pass | conv2d ms |"
    header += " mimicdet ms (x conv2d) |"
    if not args.skip_torchvision:
        header += " torchvision ms (x conv2d) |"
    if args.device == "cpu":
        header += " mimicdet scratch MiB (bound) |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    rows = []
    for dtype_name in args.dtype:
        dtype = DTYPES[dtype_name]
        for kernel, height, width in shapes:
            pad = kernel // 2
            tensors = make_case(
                args.batch, args.channels, kernel, height, width, args.device, dtype
            )
            steps = make_steps(*tensors, pad)
            best, errors = measure(args, names, steps, repeat, baseline_repeat)
            rows += json_rows((kernel, height, width), dtype_name, names, best, errors)
            memory = cpu_extra_memory_mib(
                args.batch, args.channels, kernel, height, width, tensors[0].element_size()
            )
            for phase_index, phase in enumerate(PHASES):
                base = best.get(("conv2d", phase))
                row = f"| {kernel}x{kernel} @ {height}x{width} |"
                row += f" {dtype_name} |" if show_dtype else ""
                row += f" {phase} |" + (f" {base:.1f} |" if base is not None else " n/a |")
                for name in names[1:]:
                    row += cell(best.get((name, phase)), base)
                if args.device == "cpu":
                    row += f" {memory[phase_index]:.0f} |"
                print(row)
            for name, error in errors.items():
                print(f"  ({name}, {dtype_name}: {error})")
    peak_mib = None
    if args.device == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
        print(f"\npeak CUDA memory allocated: {peak_mib:.0f} MiB")
    if args.json:
        report = {
            "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "cuda": torch.version.cuda,
            "threads": torch.get_num_threads(),
            "batch": args.batch,
            "channels": args.channels,
            "repeat": repeat,
            "warmup": args.warmup if args.device == "cuda" else 1,
            "statistic": statistic,
            "peak_memory_mib": peak_mib,
            "rows": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
