#!/usr/bin/env python
"""Times mimicdet's deform_conv2d against dense conv2d and torchvision's deform_conv2d.

Runs MimicDet's S-head shapes (N=2, C_in=C_out=256, padding k//2, random offsets with std 2)
and prints a markdown table of the best time over --repeat runs and the ratio to dense conv2d.

    python tools/benchmark_deform_conv.py                     # CPU, 2 threads, 3 repeats
    python tools/benchmark_deform_conv.py --quick             # one small shape, 1 repeat
    python tools/benchmark_deform_conv.py --device cuda
"""

import argparse
import time

import torch
import torch.nn.functional as F
import torchvision

from mimicdet.layers import deform_conv2d

# (kernel, H, W) of the S-head feature maps
SHAPES = [(5, 50, 84), (5, 25, 42), (3, 100, 167)]
QUICK_SHAPES = [(3, 25, 42)]
# Must match kColumnChunkBytes in csrc/guided_deform_conv_cpu.cpp.
CPU_COLUMN_BLOCK_BYTES = 16 << 20


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (min is kept)")
    parser.add_argument(
        "--baseline-repeat", type=int, default=1, help="runs of torchvision's slow fwd+bwd"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="one small shape, 1 repeat")
    parser.add_argument("--skip-torchvision", action="store_true")
    return parser.parse_args()


def make_case(batch, channels, kernel, height, width, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, height, width, generator=gen)
    weight = torch.randn(channels, channels, kernel, kernel, generator=gen) * 0.01
    bias = torch.randn(channels, generator=gen)
    offset = torch.randn(batch, 2 * kernel * kernel, height, width, generator=gen) * 2
    return [t.to(device).requires_grad_() for t in (x, offset, weight, bias)]


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
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def cpu_extra_memory_mib(batch, channels, kernel, height, width):
    """Upper bound of the op's CPU scratch memory (fwd, bwd): zero-bordered channels-last copy of
    the batch, the column blocks, and in backward one image's gradient and grad_weight."""
    element = 4
    padded_batch = batch * (height + 2) * (width + 2) * channels * element
    grad_weight = channels * channels * kernel * kernel * element
    forward = padded_batch + CPU_COLUMN_BLOCK_BYTES
    backward = padded_batch + padded_batch // batch + CPU_COLUMN_BLOCK_BYTES + grad_weight
    return forward / 2**20, backward / 2**20


def main():
    args = parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeat = 1 if args.quick else args.repeat
    baseline_repeat = min(repeat, args.baseline_repeat)
    names = ["conv2d", "mimicdet"] + ([] if args.skip_torchvision else ["torchvision"])
    print(
        f"device={args.device} threads={torch.get_num_threads()} repeat={repeat} "
        f"(torchvision fwd+bwd: {baseline_repeat}) N={args.batch} C_in=C_out={args.channels}\n"
    )
    header = "| shape | pass | conv2d ms | mimicdet ms (x conv2d) |"
    if not args.skip_torchvision:
        header += " torchvision ms (x conv2d) |"
    if args.device == "cpu":
        header += " mimicdet scratch MiB (bound) |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for kernel, height, width in shapes:
        pad = kernel // 2
        tensors = make_case(args.batch, args.channels, kernel, height, width, args.device)
        steps = make_steps(*tensors, pad)
        best = {}
        for name in names:  # warm-up (allocator, one-time dispatch)
            steps[name][0]()
        # Interleaved rounds, so load from other processes hits every candidate alike.
        for round_index in range(repeat):
            for name in names:
                for phase, step in zip(("fwd", "fwd+bwd"), steps[name]):
                    if phase == "fwd+bwd" and name == "torchvision":
                        if round_index >= baseline_repeat:
                            continue
                    ms = timed_ms(step, args.device)
                    best[name, phase] = min(best.get((name, phase), float("inf")), ms)
        memory = cpu_extra_memory_mib(args.batch, args.channels, kernel, height, width)
        for phase_index, phase in enumerate(("fwd", "fwd+bwd")):
            base = best["conv2d", phase]
            row = f"| {kernel}x{kernel} @ {height}x{width} | {phase} | {base:.1f} |"
            for name in names[1:]:
                row += f" {best[name, phase]:.1f} ({best[name, phase] / base:.2f}x) |"
            if args.device == "cpu":
                row += f" {memory[phase_index]:.0f} |"
            print(row)
    if args.device == "cuda":
        print(f"\npeak CUDA memory allocated: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
