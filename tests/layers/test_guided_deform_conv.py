"""mimicdet.layers.deform_conv2d / GuidedDeformConv on the CPU: parity with torchvision, gradients,
argument errors and the tracing/compile/export paths a deployment relies on."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import torchvision

from mimicdet.layers import GuidedDeformConv, deform_conv2d, deform_conv2d_at
from mimicdet.layers.guided_deform_conv import BUILT_WITH_CUDA


def out_size(size, kernel, stride, pad, dilation):
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def make_case(n, c_in, c_out, h, w, k, stride, pad, dilation, offset_std, dtype, seed):
    """Random (input, offset, weight, bias) that require grad; offsets are N(0, offset_std)."""
    gen = torch.Generator().manual_seed(seed)
    h_out, w_out = out_size(h, k, stride, pad, dilation), out_size(w, k, stride, pad, dilation)
    tensors = (
        torch.randn(n, c_in, h, w, generator=gen),
        torch.randn(n, 2 * k * k, h_out, w_out, generator=gen) * offset_std,
        torch.randn(c_out, c_in, k, k, generator=gen),
        torch.randn(c_out, generator=gen),
    )
    return [t.to(dtype).requires_grad_() for t in tensors]


def assert_close_rel(actual, expected, rtol=1e-4, name=""):
    """|actual - expected| <= rtol * max|expected|, elementwise (a scale-aware tolerance)."""
    assert actual.shape == expected.shape, f"{name}: {actual.shape} != {expected.shape}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=rtol * max(scale, 1e-6), msg=name)


def assert_matches_torchvision(inputs, stride, pad, dilation):
    """Output and the gradients of (input, offset, weight, bias) match torchvision's op."""
    out = deform_conv2d(*inputs, stride=stride, padding=pad, dilation=dilation)
    ref = torchvision.ops.deform_conv2d(*inputs, stride=stride, padding=pad, dilation=dilation)
    assert_close_rel(out, ref, name="output")
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)
    for name, grad, ref_grad in zip(("input", "offset", "weight", "bias"), grads, ref_grads):
        assert_close_rel(grad, ref_grad, name=f"grad_{name}")


# (n, c_in, c_out, h, w, k, stride, pad, dilation, offset_std): batch 0..3, channels that are not
# multiples of 8, odd sizes, and offsets large enough that many samples leave the image.
PARITY_CASES = [
    (2, 5, 7, 11, 13, 3, 1, 1, 1, 2.0),
    (1, 3, 10, 9, 7, 5, 2, 2, 1, 4.0),
    (3, 12, 5, 13, 9, 3, 2, 2, 2, 6.0),
    (2, 17, 3, 7, 11, 1, 1, 0, 1, 3.0),
    (1, 6, 9, 15, 5, 5, 1, 4, 2, 1.5),
    (2, 4, 4, 5, 5, 3, 1, 1, 1, 50.0),
    (0, 3, 2, 5, 7, 3, 1, 1, 1, 2.0),
]


@pytest.mark.parametrize(
    "case", PARITY_CASES, ids=lambda c: "n{}_c{}-{}_{}x{}_k{}_s{}_p{}_d{}".format(*c)
)
def test_matches_torchvision_forward_and_grads(case):
    *shape, offset_std = case
    n, c_in, c_out, h, w, k, stride, pad, dilation = shape
    inputs = make_case(*shape, offset_std, torch.float32, seed=sum(case[:9]))
    assert_matches_torchvision(inputs, stride, pad, dilation)


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "shape", [(1, 256, 8, 25, 30, 5, 1, 2, 1), (3, 96, 16, 19, 27, 3, 2, 1, 2)], ids=str
)
def test_threaded_chunked_path_matches_torchvision(shape, two_threads):
    """Shapes big enough for the multi-threaded kernels: several column chunks per image, one
    GEMM per thread in forward and channel-parallel scatter in backward."""
    *_, stride, pad, dilation = shape
    inputs = make_case(*shape, 3.0, torch.float32, seed=17)
    assert_matches_torchvision(inputs, stride, pad, dilation)


def test_zero_offsets_equal_dense_conv():
    x, offset, weight, bias = make_case(2, 6, 5, 9, 11, 3, 2, 1, 2, 1.0, torch.float64, seed=3)
    out = deform_conv2d(x, torch.zeros_like(offset), weight, bias, stride=2, padding=1, dilation=2)
    ref = F.conv2d(x, weight, bias, stride=2, padding=1, dilation=2)
    torch.testing.assert_close(out, ref)


def test_samples_outside_the_image_read_zero():
    x = torch.randn(1, 2, 5, 5)
    weight = torch.randn(3, 2, 3, 3)
    bias = torch.randn(3)
    offset = torch.full((1, 18, 5, 5), 1e4)
    out = deform_conv2d(x, offset, weight, bias, padding=1)
    torch.testing.assert_close(out, bias.view(1, 3, 1, 1).expand_as(out))


@pytest.fixture
def one_thread():
    """Tiny ops on one thread: BLAS would open a parallel region per call, which is slow when
    other processes load the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("stride,pad,dilation", [(1, 1, 1), (2, 2, 2)])
def test_gradcheck_float64(stride, pad, dilation, one_thread):
    # Tiny shapes: full gradcheck perturbs every element of every input (~1k op calls).
    inputs = make_case(2, 2, 2, 4, 5, 3, stride, pad, dilation, 1.5, torch.float64, seed=11)
    fn = lambda *t: deform_conv2d(*t, stride=stride, padding=pad, dilation=dilation)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_non_contiguous_inputs_match_contiguous():
    x, offset, weight, bias = make_case(2, 6, 4, 9, 7, 3, 1, 1, 1, 2.0, torch.float32, seed=5)
    ref = deform_conv2d(x, offset, weight, bias, padding=1)
    x_nc = x.detach().to(memory_format=torch.channels_last)
    offset_nc = torch.cat([offset.detach(), offset.detach()], dim=1)[:, ::2]  # strided channels
    offset_nc.copy_(offset.detach())
    weight_nc = weight.detach().transpose(2, 3).contiguous().transpose(2, 3)
    bias_nc = torch.stack([bias.detach(), bias.detach()], dim=1)[:, 0]
    assert not any(t.is_contiguous() for t in (x_nc, offset_nc, weight_nc, bias_nc))
    out = deform_conv2d(x_nc, offset_nc, weight_nc, bias_nc, padding=1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(ref).transpose(2, 3).contiguous().transpose(2, 3)
    nc = [t.requires_grad_() for t in (x_nc, offset_nc, weight_nc, bias_nc)]
    grads = torch.autograd.grad(deform_conv2d(*nc, padding=1), nc, grad_out)
    ref_grads = torch.autograd.grad(ref, (x, offset, weight, bias), grad_out)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-4)


def _good_args():
    return dict(
        input=torch.randn(2, 4, 7, 9),
        offset=torch.randn(2, 18, 7, 9),
        weight=torch.randn(5, 4, 3, 3),
        bias=torch.randn(5),
        padding=1,
    )


BAD_ARGS = [
    ("input", torch.randn(4, 7, 9), r"input must be 4-D .*\(4, 7, 9\)"),
    (
        "offset",
        torch.randn(2, 16, 7, 9),
        r"offset shape \(2, 16, 7, 9\) must have 2 \* kh \* kw = 18",
    ),
    (
        "offset",
        torch.randn(2, 18, 5, 9),
        r"offset shape \(2, 18, 5, 9\) must have the output spatial size \(7, 9\)",
    ),
    ("offset", torch.randn(3, 18, 7, 9), r"offset shape \(3, 18, 7, 9\) has batch size 3"),
    ("weight", torch.randn(5, 3, 3, 3), r"weight shape \(5, 3, 3, 3\) expects 3 input channels"),
    ("weight", torch.randn(5, 4, 3), r"weight must be 4-D .*\(5, 4, 3\)"),
    ("bias", torch.randn(4), r"bias shape \(4,\) must be \(5,\)"),
    ("offset", torch.randn(2, 18, 7, 9, dtype=torch.float64), r"offset has dtype torch.float64"),
    ("weight", torch.randn(5, 4, 3, 3, device="meta"), r"weight is on meta"),
    ("input", torch.randn(2, 4, 7, 9).half(), r"offset has dtype torch.float32 but input"),
    ("stride", 0, r"stride must be"),
    ("padding", -1, r"padding must be"),
]


@pytest.mark.parametrize("name,value,message", BAD_ARGS)
def test_bad_arguments_raise_value_error_naming_the_shape(name, value, message):
    args = _good_args()
    args[name] = value
    with pytest.raises(ValueError, match=message):
        deform_conv2d(**args)


def test_unsupported_cpu_dtype_raises():
    args = {k: v.half() if isinstance(v, torch.Tensor) else v for k, v in _good_args().items()}
    with pytest.raises(ValueError, match="dtype torch.float16 is not supported on cpu"):
        deform_conv2d(**args)


def test_raw_operator_rejects_bad_shapes_with_runtime_error():
    args = _good_args()
    with pytest.raises(RuntimeError, match=r"must have 2 \* kh \* kw = 18 channels"):
        torch.ops.mimicdet.deform_conv2d(
            args["input"], args["offset"][:, :10], args["weight"], None, 1, 1, 1, 1, 1, 1
        )
    with pytest.raises(RuntimeError, match="too small"):
        small_input, offset = torch.randn(1, 4, 2, 2), torch.randn(1, 18, 1, 1)
        no_padding = (1, 1, 0, 0, 1, 1)
        torch.ops.mimicdet.deform_conv2d(small_input, offset, args["weight"], None, *no_padding)


def test_module_repr_and_forward():
    layer = GuidedDeformConv(6, 8, 5, dilation=2, bias=False)
    assert repr(layer) == (
        "GuidedDeformConv(6, 8, kernel_size=(5, 5), stride=(1, 1), padding=(4, 4), "
        "dilation=(2, 2), bias=False)"
    )
    assert repr(GuidedDeformConv(3, 4, (3, 1), stride=2)) == (
        "GuidedDeformConv(3, 4, kernel_size=(3, 1), stride=(2, 2), padding=(1, 0))"
    )
    x = torch.randn(2, 6, 11, 9)
    offset = torch.randn(2, 50, 11, 9)
    out = layer(x, offset)
    assert out.shape == (2, 8, 11, 9)  # default padding keeps the size at stride 1
    torch.testing.assert_close(out, deform_conv2d(x, offset, layer.weight, None, 1, 4, 2))
    out.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_module_init_is_conv_like():
    layer = GuidedDeformConv(64, 32, 3)
    bound = 1 / (64 * 9) ** 0.5
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    assert layer.weight.std() > bound / 4


def test_jit_trace_save_and_reload_in_fresh_process(tmp_path):
    torch.manual_seed(0)
    layer = GuidedDeformConv(4, 6, 3).eval()
    x, offset = torch.randn(1, 4, 9, 7), torch.randn(1, 18, 9, 7) * 2
    traced = torch.jit.trace(layer, (x, offset))
    torch.jit.save(traced, str(tmp_path / "model.pt"))
    torch.save({"x": x, "offset": offset, "out": layer(x, offset).detach()}, tmp_path / "io.pt")
    script = textwrap.dedent("""
        import sys, torch
        import mimicdet.layers  # registers torch.ops.mimicdet
        model = torch.jit.load(sys.argv[1] + "/model.pt")
        io = torch.load(sys.argv[1] + "/io.pt")
        assert torch.equal(model(io["x"], io["offset"]), io["out"])
        print("RELOAD_OK")
        """)
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert result.returncode == 0 and "RELOAD_OK" in result.stdout, result.stderr


def test_torch_compile_forward_and_backward_match_eager():
    inputs = make_case(2, 5, 4, 9, 11, 3, 1, 1, 1, 2.0, torch.float32, seed=7)
    fn = lambda x, o, w, b: deform_conv2d(x, o, w, b, padding=1).relu()  # noqa: E731
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out, ref = compiled(*inputs), fn(*inputs)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.sum(), inputs)
    ref_grads = torch.autograd.grad(ref.sum(), inputs)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad)


def test_torch_export_keeps_the_operator():
    layer = GuidedDeformConv(4, 6, 3, stride=2).eval()
    x, offset = torch.randn(2, 4, 9, 7), torch.randn(2, 18, 5, 4)
    exported = torch.export.export(layer, (x, offset))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "mimicdet.deform_conv2d.default" in targets
    torch.testing.assert_close(exported.module()(x, offset), layer(x, offset))


def test_autocast_bfloat16_computes_in_float32_and_returns_the_input_dtype():
    """A bf16 activation meets the float32 weight under CPU autocast (what AMP training does)."""
    x, offset, weight, bias = make_case(2, 8, 6, 9, 11, 3, 1, 1, 1, 2.0, torch.float32, seed=3)
    x_low = x.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deform_conv2d(x_low, offset, weight, bias, padding=1)
    assert out.dtype == torch.bfloat16
    # The same op in float32 on the bf16-rounded input, rounded to bf16 at the end.
    ref = deform_conv2d(x_low.detach().float(), offset, weight, bias, padding=1)
    torch.testing.assert_close(out, ref.bfloat16(), rtol=0, atol=0)
    out.float().square().sum().backward()
    assert x_low.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    for tensor in (x_low, offset, weight, bias):
        assert torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


@pytest.mark.skipif(BUILT_WITH_CUDA, reason="this build has CUDA kernels")
@pytest.mark.parametrize("op_name", ["deform_conv2d", "_deform_conv2d_backward"])
def test_cuda_tensors_on_a_cpu_only_build_name_the_rebuild_command(op_name):
    """What a CUDA tensor meets in a library built where no GPU was visible (the CUDA kernel is
    reached here through the dispatcher with CPU tensors, as a CUDA tensor would reach it)."""
    args = _good_args()
    x, offset, weight = args["input"], args["offset"], args["weight"]
    conv_args = (1, 1, 1, 1, 1, 1)
    op = getattr(torch.ops.mimicdet, op_name).default
    if op_name == "deform_conv2d":
        tensors = (x, offset, weight, None)
    else:
        tensors = (torch.ones(2, 5, 7, 9), x, offset, weight)
    cuda_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with pytest.raises(RuntimeError, match=r"built without CUDA kernels.*FORCE_CUDA=1"):
        op.redispatch(cuda_only, *tensors, *conv_args)


@pytest.mark.parametrize(
    "case", PARITY_CASES[:-1] + [(1, 8, 3, 1, 1, 5, 1, 2, 1, 0.7)], ids=lambda c: str(c[:9])
)
def test_deform_conv2d_at_equals_the_op_at_those_positions(case):
    """The sparse form inference uses: any output positions, in any order, with their offsets."""
    *shape, offset_std = case
    n, c_in, c_out, h, w, k, stride, pad, dilation = shape
    x, offset, weight, bias = make_case(*shape, offset_std, torch.float32, seed=sum(case[:9]))
    with torch.no_grad():
        dense = deform_conv2d(
            x, offset, weight, bias, stride=stride, padding=pad, dilation=dilation
        )
        grid = torch.meshgrid(*(torch.arange(s) for s in (n, *dense.shape[2:])), indexing="ij")
        positions = torch.stack(grid, dim=-1).reshape(-1, 3)
        shuffle = torch.randperm(len(positions), generator=torch.Generator().manual_seed(0))
        positions = positions[shuffle]
        image, row, col = positions.unbind(1)
        sparse = deform_conv2d_at(
            x, offset[image, :, row, col], weight, bias, positions, stride, pad, dilation
        )
    assert_close_rel(sparse, dense[image, :, row, col], name="output")


def test_deform_conv2d_at_follows_the_op_under_autocast_and_for_non_finite_offsets():
    """Like the op: float32 sampling under bf16 autocast (bf16 coordinates would snap to whole
    pixels on a 167-wide map), and a NaN or infinite offset reads zero, not NaN."""
    x, offset, weight, bias = make_case(1, 16, 8, 20, 167, 3, 1, 1, 1, 2.0, torch.float32, seed=5)
    offset = offset.detach().clone()
    offset[0, 0, 3, 150] = float("nan")
    offset[0, 5, 7, 160] = float("inf")
    positions = torch.tensor([[0, 3, 150], [0, 7, 160], [0, 10, 140], [0, 19, 166]])
    image, row, col = positions.unbind(1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        x_low = x.bfloat16()
        dense = deform_conv2d(x_low, offset, weight, bias, padding=1)[image, :, row, col]
        sparse = deform_conv2d_at(x_low, offset[image, :, row, col], weight, bias, positions, 1, 1)
    assert sparse.dtype == dense.dtype == torch.bfloat16
    assert torch.isfinite(sparse).all()
    assert_close_rel(sparse.float(), dense.float(), rtol=1e-2, name="output")


def test_missing_compiled_op_names_the_build_command():
    """Without a build of mimicdet._C for this Python (the GPU check's Python 3.12 before its build
    step, 2026-12-04), importing mimicdet said only "circular import"."""
    script = textwrap.dedent("""
        import importlib.abc, sys

        class NoCompiledOp(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "mimicdet._C":
                    raise ImportError("No module named 'mimicdet._C'")

        sys.meta_path.insert(0, NoCompiledOp())
        import mimicdet
    """)
    package_root = os.path.join(os.path.dirname(__file__), "..", "..", "projects", "MimicDet")
    python_path = f"{package_root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = dict(os.environ, PYTHONPATH=python_path)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert "mimicdet._C) could not be imported for Python" in message, result.stderr[-2000:]
    assert "python setup.py build_ext --inplace" in message
