"""CUDA side of mimicdet's deform_conv2d: the .cu sources compile and link with nvcc, and (with a
GPU) the kernels match torchvision in float32, half precision tracks float32 and gradients are
exact in float64."""

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from torch.utils import cpp_extension

REPO = Path(__file__).resolve().parents[2]
CSRC = REPO / "projects" / "MimicDet" / "mimicdet" / "layers" / "csrc"
EXT_NAME = "mimicdet_cuda_build_check"


def _cuda_home():
    """A CUDA toolkit with nvcc and libcudart (a bare nvcc wrapper on PATH cannot link)."""
    candidates = (os.environ.get("CUDA_HOME"), "/usr/local/cuda", cpp_extension.CUDA_HOME)
    for home in filter(None, candidates):
        home = Path(home)
        if (home / "bin" / "nvcc").exists() and any(home.glob("lib*/libcudart.so*")):
            return str(home)
    return None


BUILD_SCRIPT = textwrap.dedent("""
    import sys

    from torch.utils.cpp_extension import load

    build_dir, csrc, *sources = sys.argv[1:]
    try:
        module = load(
            name="%s",
            sources=sources,
            build_directory=build_dir,
            extra_include_paths=[csrc],
            extra_cflags=["-O3", "-fopenmp", "-DWITH_CUDA"],
            extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "-DWITH_CUDA"],
            extra_ldflags=["-fopenmp"],
            with_cuda=True,
        )
        # the module's flag: a CPU-only build registers a (raising) CUDA kernel as well
        print("LOADED cuda_kernel=%%s" %% module.BUILT_WITH_CUDA)
    except OSError as exc:  # built and linked, but loading may need a GPU driver
        print("LOAD_FAILED", exc)
    """ % EXT_NAME)


@pytest.mark.slow
@pytest.mark.skipif(torch.version.cuda is None, reason="torch was built without CUDA")
@pytest.mark.skipif(_cuda_home() is None, reason="nvcc / CUDA_HOME not found")
def test_cuda_sources_compile_and_link():
    sources = sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.cu"))
    digest = hashlib.sha1(torch.__version__.encode())
    for path in sorted(CSRC.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    # Keyed by the sources, so reruns reuse the ninja build and finish in seconds.
    build_dir = REPO / "build" / f"cuda_ext_{digest.hexdigest()[:12]}"
    build_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CUDA_HOME=_cuda_home(), TORCH_CUDA_ARCH_LIST="9.0")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    result = subprocess.run(
        [sys.executable, "-c", BUILD_SCRIPT, str(build_dir), str(CSRC)] + [str(s) for s in sources],
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert (build_dir / f"{EXT_NAME}.so").exists()
    if "LOADED" in result.stdout or torch.cuda.is_available():
        assert "LOADED cuda_kernel=True" in result.stdout, result.stdout


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _make_case(n, c_in, c_out, h, w, k, stride, pad, dilation, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    h_out = (h + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    w_out = (w + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    tensors = (
        torch.randn(n, c_in, h, w, generator=gen),
        torch.randn(n, 2 * k * k, h_out, w_out, generator=gen) * 3,
        torch.randn(c_out, c_in, k, k, generator=gen),
        torch.randn(c_out, generator=gen),
    )
    return [t.to("cuda", dtype).requires_grad_() for t in tensors]


def _same_values(tensors, dtype):
    """The reference inputs of a half-precision case: its rounded values, in ``dtype``. Rounding an
    offset can move its sample across a pixel edge, where grad_offset jumps: measured with the
    float32 op alone, that moves grad_offset by up to 23% of its largest value for float16's
    rounding and 61% for bfloat16's, which says nothing of the half-precision kernels."""
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


def _assert_close_rel(actual, expected, rtol, name):
    scale = max(expected.abs().max().item(), 1e-6) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=rtol * scale, msg=name)


# (n, c_in, c_out, h, w, k, stride, pad, dilation). The last two are the S-head at P3 (3x3) and
# P4 (5x5) of an 800x1333 image, batch 2: each image's column buffer (150 MB and 102 MB in
# float32) exceeds the op's 64 MiB budget, so they run in chunks.
CUDA_CASES = [
    (2, 5, 7, 11, 13, 3, 1, 1, 1),
    (3, 12, 5, 13, 9, 5, 2, 2, 2),
    (2, 40, 24, 25, 42, 5, 1, 2, 1),
    (2, 256, 256, 100, 167, 3, 1, 1, 1),
    (2, 256, 256, 50, 84, 5, 1, 2, 1),
]


@pytest.mark.cuda
@requires_gpu
@pytest.mark.parametrize("case", CUDA_CASES)
def test_cuda_matches_torchvision_float32(case):
    from mimicdet.layers import deform_conv2d

    *shape, stride, pad, dilation = case
    inputs = _make_case(*shape, stride, pad, dilation, torch.float32, seed=sum(case))
    out = deform_conv2d(*inputs, stride=stride, padding=pad, dilation=dilation)
    ref = torchvision.ops.deform_conv2d(*inputs, stride=stride, padding=pad, dilation=dilation)
    _assert_close_rel(out, ref, 1e-4, "output")
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)
    for name, grad, ref_grad in zip(("input", "offset", "weight", "bias"), grads, ref_grads):
        _assert_close_rel(grad, ref_grad, 1e-4, f"grad_{name}")


@pytest.mark.cuda
@requires_gpu
@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 1e-2), (torch.bfloat16, 4e-2)])
def test_cuda_half_precision_tracks_float32(dtype, rtol):
    from mimicdet.layers import deform_conv2d

    low = _make_case(2, 16, 8, 15, 17, 3, 1, 1, 1, dtype, seed=1)
    inputs = _same_values(low, torch.float32)
    out = deform_conv2d(*low, padding=1)
    ref = deform_conv2d(*inputs, padding=1)
    assert out.dtype == dtype
    _assert_close_rel(out.float(), ref, rtol, "output")
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, low, grad_out.to(dtype))
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)
    for name, grad, ref_grad in zip(("input", "offset", "weight", "bias"), grads, ref_grads):
        assert grad.dtype == dtype and torch.isfinite(grad).all(), name
        _assert_close_rel(grad.float(), ref_grad, 5 * rtol, f"grad_{name}")


@pytest.mark.cuda
@requires_gpu
def test_cuda_gradcheck_float64():
    from mimicdet.layers import deform_conv2d

    inputs = _make_case(2, 3, 2, 5, 6, 3, 2, 1, 2, torch.float64, seed=4)
    fn = lambda *t: deform_conv2d(*t, stride=2, padding=1, dilation=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.cuda
@requires_gpu
def test_cuda_float16_at_s_head_size_tracks_float64():
    """Half precision over 2 x 16,700 positions: grad_weight sums all of them, so it is the one
    that rounding partial sums to half would spoil."""
    from mimicdet.layers import deform_conv2d

    low = _make_case(2, 256, 64, 100, 167, 3, 1, 1, 1, torch.float16, seed=7)
    inputs = _same_values(low, torch.float64)
    out = deform_conv2d(*low, padding=1)
    ref = deform_conv2d(*inputs, padding=1)
    _assert_close_rel(out.double(), ref, 1e-2, "output")
    grad_out = torch.randn_like(ref) / ref.numel() ** 0.5
    grads = torch.autograd.grad(out, low, grad_out.half())
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)
    for name, grad, ref_grad in zip(("input", "offset", "weight", "bias"), grads, ref_grads):
        assert torch.isfinite(grad).all(), name
        _assert_close_rel(grad.double(), ref_grad, 2e-2, f"grad_{name}")


@pytest.mark.cuda
@requires_gpu
def test_cuda_backward_raises_under_deterministic_algorithms():
    from mimicdet.layers import deform_conv2d

    inputs = _make_case(1, 4, 4, 6, 6, 3, 1, 1, 1, torch.float32, seed=0)
    torch.use_deterministic_algorithms(True)
    try:
        out = deform_conv2d(*inputs, padding=1)  # the forward has no atomics: allowed
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.cuda
@requires_gpu
def test_cuda_amp_float16_training_steps_with_grad_scaler(cfg, make_inputs):
    """What SOLVER.AMP.ENABLED True runs: float16 autocast forward, scaled backward. GradScaler
    starts at a scale of 2**16, so the first steps may overflow float16 gradients: such a step must
    be skipped with a lower scale, and the steps after it must train, the deform convs too."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    cfg.MODEL.DEVICE = "cuda"
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda")
    start = {name: conv.weight.detach().clone() for name, conv in model.s_head.deform_convs.items()}
    history = []  # (scale before the step, whether every gradient was finite)
    with EventStorage():
        for _ in range(8):
            with torch.autocast("cuda", dtype=torch.float16):
                losses = model(make_inputs())
            assert all(torch.isfinite(v) for v in losses.values()), losses
            scaler.scale(sum(losses.values())).backward()
            scaler.unscale_(optimizer)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            finite = all(bool(torch.isfinite(g).all()) for g in grads)
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            history.append((scale, finite))
            if not finite:
                assert scaler.get_scale() < scale, f"an overflow did not lower the scale: {history}"
            if sum(ok for _, ok in history) >= 3:
                break
    assert sum(ok for _, ok in history) >= 3, f"fewer than 3 finite steps in 8: {history}"
    for name, conv in model.s_head.deform_convs.items():
        assert not torch.equal(conv.weight, start[name]), f"{name} was never updated"
