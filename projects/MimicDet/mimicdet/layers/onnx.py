"""
ONNX export of ``mimicdet::deform_conv2d`` as the standard ``DeformConv`` operator (opset 19).

ONNX's ``DeformConv`` takes ``(X, W, offset, B)`` with torchvision's offset layout, the one this
op has: a ``(dy, dx)`` pair per kernel tap, taps in row-major order. onnxruntime implements it on
the CPU. The mapping is for torch's TorchScript-based exporter (``torch.onnx.export(...,
dynamo=False)``), the one ``tools/export_model.py`` uses for detectron2 models.

The deploy model itself needs no mapping: at inference the S-head evaluates the deformable conv
at the top refined boxes with plain ATen ops (``deform_conv2d_at``). This covers any other graph
that calls the op, e.g. a ``GuidedDeformConv`` run densely.
"""

import torch

# DeformConv entered the standard operator set in opset 19
DEFORM_CONV_OPSET = 19
_OP_NAME = "mimicdet::deform_conv2d"


def _deform_conv2d_symbolic(g, input, offset, weight, bias, *conv_args):
    from torch.onnx import symbolic_helper

    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w = (
        symbolic_helper._get_const(value, "i", name) for value, name in zip(conv_args, "shpPdD")
    )
    kernel = symbolic_helper._get_tensor_sizes(weight)[2:]
    if kernel is None or None in kernel:
        raise RuntimeError(f"ONNX export of {_OP_NAME}: the weight's kernel size must be static")
    inputs = [input, weight, offset]
    if not symbolic_helper._is_none(bias):
        inputs.append(bias)
    return g.op(
        "DeformConv",
        *inputs,
        kernel_shape_i=list(kernel),
        strides_i=[stride_h, stride_w],
        pads_i=[pad_h, pad_w, pad_h, pad_w],
        dilations_i=[dilation_h, dilation_w],
        group_i=1,
        offset_group_i=1,
    )


def register_onnx_symbolic() -> None:
    """Lets ``torch.onnx.export(..., opset_version>=19, dynamo=False)`` write the op as
    ``DeformConv``; below opset 19 the exporter refuses the op by name. Safe to call again."""
    torch.onnx.register_custom_op_symbolic(_OP_NAME, _deform_conv2d_symbolic, DEFORM_CONV_OPSET)
