"""Deformable convolution for MimicDet's guided (S-head) features.

``deform_conv2d`` has the arguments, offset layout and results of
``torchvision.ops.deform_conv2d`` without the modulation mask, with one weight group and one
offset group. It runs the compiled operator ``torch.ops.mimicdet.deform_conv2d`` (CPU and CUDA
kernels in ``csrc/``); this module registers its autograd formula and its fake (meta) kernel,
so the op works under autograd, ``torch.jit.trace``, ``torch.compile`` and ``torch.export``.

Under ``torch.autocast`` (CPU or CUDA) the op computes in float32, as torchvision's does, and
returns the input's dtype. ``BUILT_WITH_CUDA`` says whether the installed library has CUDA
kernels; without them a CUDA input raises an error naming the rebuild command.
"""

import math
import os
import sys
from typing import Optional, Tuple, Union

import torch
from torch import nn
from torch.nn.modules.utils import _pair

try:
    from mimicdet import _C  # importing the extension registers torch.ops.mimicdet
except ImportError as exc:
    # Otherwise Python reports a "circular import" of mimicdet, which hides the missing build.
    raise ImportError(
        f"mimicdet's compiled op (mimicdet._C) could not be imported for Python "
        f"{sys.version.split()[0]} from {os.path.dirname(os.path.dirname(__file__))} ({exc}). "
        "Build it: `make setup`, or `python setup.py build_ext --inplace` in the repository root."
    ) from exc

__all__ = ["deform_conv2d", "deform_conv2d_at", "GuidedDeformConv", "BUILT_WITH_CUDA"]

BUILT_WITH_CUDA: bool = _C.BUILT_WITH_CUDA

IntPair = Union[int, Tuple[int, int]]

_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _out_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def _as_pair(value: IntPair, name: str, minimum: int) -> Tuple[int, int]:
    pair = _pair(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= minimum for v in pair):
        raise ValueError(
            f"deform_conv2d: {name} must be an int or a pair of ints >= {minimum}, "
            f"got {value!r}"
        )
    return pair


def _check_tensors(input, offset, weight, bias, stride_hw, pad_hw, dilation_hw):
    for name, tensor, layout in (
        ("input", input, "(N, C_in, H, W)"),
        ("offset", offset, "(N, 2 * kh * kw, H_out, W_out)"),
        ("weight", weight, "(C_out, C_in, kh, kw)"),
    ):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"deform_conv2d: {name} must be a Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(
                f"deform_conv2d: {name} must be 4-D {layout}, got shape {tuple(tensor.shape)}"
            )
    # Under autocast the op's autocast kernel casts every tensor to float32 first.
    autocast = torch.is_autocast_enabled(input.device.type)
    for name, tensor in (("offset", offset), ("weight", weight), ("bias", bias)):
        if tensor is None:
            continue
        if tensor.device != input.device:
            raise ValueError(
                f"deform_conv2d: {name} is on {tensor.device} but input is on {input.device}"
            )
        if tensor.dtype != input.dtype and not autocast:
            raise ValueError(
                f"deform_conv2d: {name} has dtype {tensor.dtype} but input has {input.dtype}"
            )
    supported = _CUDA_DTYPES if input.device.type == "cuda" else _CPU_DTYPES
    if input.dtype not in supported and not autocast:
        raise ValueError(
            f"deform_conv2d: dtype {input.dtype} is not supported on "
            f"{input.device.type}; use one of {supported}"
        )
    n, c_in, h, w = input.shape
    c_out, w_in, kh, kw = weight.shape
    if w_in != c_in:
        raise ValueError(
            f"deform_conv2d: weight shape {tuple(weight.shape)} expects {w_in} input "
            f"channels but input shape {tuple(input.shape)} has {c_in} (groups are "
            "not supported)"
        )
    if kh == 0 or kw == 0:
        raise ValueError(f"deform_conv2d: empty kernel in weight shape {tuple(weight.shape)}")
    if offset.shape[0] != n:
        raise ValueError(
            f"deform_conv2d: offset shape {tuple(offset.shape)} has batch size "
            f"{offset.shape[0]} but input shape {tuple(input.shape)} has {n}"
        )
    if offset.shape[1] != 2 * kh * kw:
        raise ValueError(
            f"deform_conv2d: offset shape {tuple(offset.shape)} must have "
            f"2 * kh * kw = {2 * kh * kw} channels for a {kh}x{kw} kernel (offset "
            "groups are not supported)"
        )
    out_h = _out_size(h, kh, stride_hw[0], pad_hw[0], dilation_hw[0])
    out_w = _out_size(w, kw, stride_hw[1], pad_hw[1], dilation_hw[1])
    if out_h <= 0 or out_w <= 0:
        raise ValueError(
            f"deform_conv2d: input shape {tuple(input.shape)} is too small for a "
            f"{kh}x{kw} kernel with padding {pad_hw} and dilation {dilation_hw}"
        )
    if tuple(offset.shape[2:]) != (out_h, out_w):
        raise ValueError(
            f"deform_conv2d: offset shape {tuple(offset.shape)} must have the "
            f"output spatial size ({out_h}, {out_w})"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != c_out):
        raise ValueError(f"deform_conv2d: bias shape {tuple(bias.shape)} must be ({c_out},)")


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
) -> torch.Tensor:
    """Deformable 2-D convolution, as ``torchvision.ops.deform_conv2d`` without ``mask``.

    Args:
        input: (N, C_in, H, W).
        offset: (N, 2 * kh * kw, H_out, W_out); channel 2 * k is the y (row) offset and
            2 * k + 1 the x (column) offset of kernel tap k = i * kw + j. Samples falling
            outside the image read zeros.
        weight: (C_out, C_in, kh, kw).
        bias: (C_out,) or None.
        stride, padding, dilation: int or (h, w) pair, as in ``torch.nn.functional.conv2d``.

    Returns:
        (N, C_out, H_out, W_out), H_out = (H + 2 * pad_h - dil_h * (kh - 1) - 1) // stride_h + 1.
    """
    stride_hw = _as_pair(stride, "stride", 1)
    pad_hw = _as_pair(padding, "padding", 0)
    dilation_hw = _as_pair(dilation, "dilation", 1)
    # Traced shapes are tensors; the C++ op repeats these checks, so skip them (and the warnings).
    if not torch.jit.is_tracing():
        _check_tensors(input, offset, weight, bias, stride_hw, pad_hw, dilation_hw)
    return torch.ops.mimicdet.deform_conv2d(
        input, offset, weight, bias, *stride_hw, *pad_hw, *dilation_hw
    )


def deform_conv2d_at(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    positions: torch.Tensor,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
) -> torch.Tensor:
    """
    :func:`deform_conv2d` evaluated at a few output positions only: row ``m`` of the result is
    ``deform_conv2d(input, full_offset, ...)[n, :, y, x]`` for ``positions[m] = (n, y, x)``
    whenever ``full_offset[n, :, y, x] == offset[m]``. The same sampling rule (bilinear, zero
    outside the image, torchvision's ``(dy, dx)`` layout) in plain PyTorch ops: M positions
    cost M * C_in * kh * kw samples and one ``(M, C_in * kh * kw)`` GEMM, which is what
    inference needs when only the top-scoring locations are read (MimicDet's S-head).

    Args:
        input: (N, C_in, H, W).
        offset: (M, 2 * kh * kw), the offsets of those positions.
        weight: (C_out, C_in, kh, kw); bias: (C_out,) or None.
        positions: (M, 3) int64 ``(image, out_row, out_col)``.
        stride, padding, dilation: as :func:`deform_conv2d`.

    Returns:
        (M, C_out).
    """
    stride_h, stride_w = _as_pair(stride, "stride", 1)
    pad_h, pad_w = _as_pair(padding, "padding", 0)
    dil_h, dil_w = _as_pair(dilation, "dilation", 1)
    kh, kw = weight.shape[2:]
    taps = kh * kw
    # In a trace, M is a tensor-derived constant (in torch.export, a data-dependent size): no
    # check, and no shape built from it below.
    if not (torch.jit.is_tracing() or torch.compiler.is_exporting()) and (
        offset.shape != (len(positions), 2 * taps) or positions.shape != (len(positions), 3)
    ):
        raise ValueError(
            f"deform_conv2d_at: offset shape {tuple(offset.shape)} and positions shape "
            f"{tuple(positions.shape)} must be (M, {2 * taps}) and (M, 3)"
        )
    # In float32 (float64 stays) like the op's kernels under autocast: sampling coordinates in
    # half precision would be rounded to whole pixels on wide maps.
    dtype = torch.promote_types(input.dtype, torch.float32)
    with torch.autocast(input.device.type, enabled=False):
        out = _sample_and_multiply(
            input.to(dtype), offset.to(dtype), weight.to(dtype), positions,
            (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w), (kh, kw),
        )  # fmt: skip
        if bias is not None:
            out = out + bias.to(dtype)
    return out.to(input.dtype)


def _sample_and_multiply(input, offset, weight, positions, conv_args, kernel):
    """``deform_conv2d_at`` without its checks and casts; see there."""
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w = conv_args
    kh, kw = kernel
    c_in, height, width = input.shape[1:]
    image, out_y, out_x = positions.unbind(1)
    tap_y = (torch.arange(kh, device=input.device) * dil_h).repeat_interleave(kw)
    tap_x = (torch.arange(kw, device=input.device) * dil_w).repeat(kh)
    offset = offset.reshape(-1, kh * kw, 2)
    # (M, taps) sampling coordinates, as sample_coord() in csrc/guided_deform_conv_math.h
    h = (out_y[:, None] * stride_h - pad_h + tap_y).to(input.dtype) + offset[..., 0]
    w = (out_x[:, None] * stride_w - pad_w + tap_x).to(input.dtype) + offset[..., 1]
    # as bilinear_point(): a positive test, so NaN coordinates count as outside
    inside = (h > -1) & (h < height) & (w > -1) & (w < width)
    h_low, w_low = h.floor(), w.floor()
    lh, lw = h - h_low, w - w_low
    h_low = torch.where(inside, h_low, torch.zeros_like(h_low)).long()
    w_low = torch.where(inside, w_low, torch.zeros_like(w_low)).long()
    pixels = input.permute(0, 2, 3, 1).reshape(-1, c_in)  # (N * H * W, C_in)
    terms = []
    for dy, dx, corner_weight in (
        (0, 0, (1 - lh) * (1 - lw)),
        (0, 1, (1 - lh) * lw),
        (1, 0, lh * (1 - lw)),
        (1, 1, lh * lw),
    ):
        y, x = h_low + dy, w_low + dx
        valid = inside & (y >= 0) & (y < height) & (x >= 0) & (x < width)
        flat = (image[:, None] * height + y.clamp(0, height - 1)) * width + x.clamp(0, width - 1)
        # where(), not a product with the mask: a corner outside must read 0 even if it is inf
        term = corner_weight[..., None] * pixels[flat]
        terms.append(torch.where(valid[..., None], term, torch.zeros_like(term)))
    columns = terms[0] + terms[1] + terms[2] + terms[3]  # (M, taps, C_in)
    # weight rows in (tap, channel) order, as the columns
    return columns.flatten(1) @ weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).t()


@torch.library.register_fake("mimicdet::deform_conv2d")
def _deform_conv2d_fake(
    input, offset, weight, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w
):
    out_h = _out_size(input.shape[2], weight.shape[2], stride_h, pad_h, dil_h)
    out_w = _out_size(input.shape[3], weight.shape[3], stride_w, pad_w, dil_w)
    return input.new_empty((input.shape[0], weight.shape[0], out_h, out_w))


@torch.library.register_fake("mimicdet::_deform_conv2d_backward")
def _deform_conv2d_backward_fake(grad_output, input, offset, weight, *conv_args):
    return torch.empty_like(input), torch.empty_like(offset), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    input, offset, weight, bias, *conv_args = inputs
    ctx.save_for_backward(input, offset, weight)
    ctx.conv_args = conv_args
    ctx.has_bias = bias is not None


def _backward(ctx, grad_output):
    input, offset, weight = ctx.saved_tensors
    grad_input = grad_offset = grad_weight = grad_bias = None
    if any(ctx.needs_input_grad[:3]):
        grad_input, grad_offset, grad_weight = torch.ops.mimicdet._deform_conv2d_backward(
            grad_output, input, offset, weight, *ctx.conv_args
        )
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad_output.sum((0, 2, 3))
    return (grad_input, grad_offset, grad_weight, grad_bias) + (None,) * len(ctx.conv_args)


torch.library.register_autograd("mimicdet::deform_conv2d", _backward, setup_context=_setup_context)


class GuidedDeformConv(nn.Module):
    """A conv layer that samples its input at learned offsets (``deform_conv2d``).

    Args:
        in_channels, out_channels: C_in, C_out.
        kernel_size: int or (kh, kw).
        stride, dilation: int or (h, w).
        padding: int or (h, w); defaults to ``kernel_size // 2 * dilation`` ("same" at stride 1).
        bias: whether to add a learned (C_out,) bias.

    Shapes:
        forward(x, offset): x (N, C_in, H, W), offset (N, 2 * kh * kw, H_out, W_out)
        -> (N, C_out, H_out, W_out).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: Optional[IntPair] = None,
        dilation: IntPair = 1,
        bias: bool = True,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        if padding is None:
            padding = tuple(k // 2 * d for k, d in zip(self.kernel_size, self.dilation))
        self.padding = _pair(padding)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialises like ``nn.Conv2d`` (Kaiming-uniform weight, fan-in-scaled bias)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return deform_conv2d(
            x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation
        )

    def forward_at(
        self, x: torch.Tensor, offset: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """``forward`` at ``positions`` (M, 3) only, with their offsets (M, 2 * kh * kw);
        returns (M, C_out). See :func:`deform_conv2d_at`."""
        return deform_conv2d_at(
            x, offset, self.weight, self.bias, positions, self.stride, self.padding, self.dilation
        )

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.bias is None:
            text += ", bias=False"
        return text
