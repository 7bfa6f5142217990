#!/usr/bin/env python
"""
Export the MimicDet deploy model (no T-head, no P2) to TorchScript or ONNX by tracing it with
detectron2's ``TracingAdapter``, as detectron2's ``tools/deploy/export_model.py`` does.

    python tools/export_model.py --config-file configs/COCO-Detection/mimicdet_R_50_FPN_1x.yaml \\
        --format onnx --output out/onnx --sample-image img.jpg MODEL.WEIGHTS model_deploy.pth

``--format onnx`` writes ``model.onnx`` at opset 19 (``mimicdet::deform_conv2d`` maps to the
standard ``DeformConv``, see ``mimicdet.layers.onnx``), then runs it with onnxruntime on the
sample image and fails unless its detections are the eager model's (same count and classes,
boxes within ``ONNX_BOX_ATOL`` px, scores within ``ONNX_SCORE_ATOL``).
``--format torchscript`` writes ``model.ts`` (torch marks ``torch.jit.trace`` deprecated; it
stays supported here).

The traced model takes one image, a ``(3, H, W)`` float tensor in the config's input format
(BGR by default), already resized as the test-time augmentation would, and returns the flat
tuple ``(pred_boxes (K, 4), pred_classes (K,), scores (K,), image_size (2,))`` (Instances
fields in name order); the boxes are in that input's pixel coordinates. Load it with the op
library registered::

    import torch, mimicdet.layers  # registers torch.ops.mimicdet.deform_conv2d
    model = torch.jit.load("out/ts/model.ts")

Limits: one image per call (the batch size is traced), and the padded input shape is traced too
(anchors, feature grids, clipping): feed images of the sample image's size after resizing. The
data-dependent parts (score threshold, top-k, NMS, number of detections) stay dynamic. At another
size the trace fails or returns other boxes. Inference evaluates the S-head's deformable conv at
the top refined boxes with plain ATen ops, so the traced graph holds no ``mimicdet::`` op. The
ONNX file takes the input named ``image`` and has the outputs ``pred_boxes``, ``pred_classes``,
``scores`` and ``image_size``.
"""

import argparse
import importlib.util
import os
import sys

import cv2
import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model

import mimicdet.layers  # noqa: F401 registers torch.ops.mimicdet for tracing
from mimicdet import WeightsOnlyCheckpointer, add_mimicdet_config
from mimicdet.layers.onnx import DEFORM_CONV_OPSET, register_onnx_symbolic

# the ONNX opset: the first with DeformConv
ONNX_OPSET = DEFORM_CONV_OPSET
ONNX_OUTPUTS = ["pred_boxes", "pred_classes", "scores", "image_size"]
# onnxruntime against the eager model: float32 arithmetic in another order (measured: 6e-5 px on
# a 448 px DeepForest image, 4e-7 in score)
ONNX_BOX_ATOL, ONNX_SCORE_ATOL = 1e-2, 1e-4


def _import_tracing_adapter():
    """
    ``detectron2.export.TracingAdapter``. detectron2 v0.6's ``detectron2/export/__init__.py``
    imports caffe2 unconditionally (upstream later made it optional); without caffe2, import
    ``export/flatten.py`` under an empty package instead of running that ``__init__``.
    """
    try:
        from detectron2.export import TracingAdapter
    except ImportError:
        sys.modules.pop("detectron2.export", None)
        spec = importlib.util.find_spec("detectron2.export")
        sys.modules["detectron2.export"] = importlib.util.module_from_spec(spec)
        from detectron2.export.flatten import TracingAdapter
    return TracingAdapter


TracingAdapter = _import_tracing_adapter()


def setup_cfg(config_file, opts):
    cfg = get_cfg()
    add_mimicdet_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    cfg.MODEL.DEVICE = "cpu" if not torch.cuda.is_available() else cfg.MODEL.DEVICE
    cfg.freeze()
    return cfg


def build_deploy_model(cfg):
    """The eval-mode model with its weights; the T-head and P2 never run at inference."""
    model = build_model(cfg)
    WeightsOnlyCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


def preprocess(cfg, image_bgr: np.ndarray) -> torch.Tensor:
    """A BGR uint8 ``(H, W, 3)`` image -> the ``(3, H', W')`` float tensor the model reads."""
    aug = T.ResizeShortestEdge(
        [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
    )
    if cfg.INPUT.FORMAT == "RGB":
        image_bgr = image_bgr[:, :, ::-1]
    image = aug.get_transform(image_bgr).apply_image(image_bgr)
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)).astype("float32"))


def tracing_adapter(model, image: torch.Tensor) -> TracingAdapter:
    """Wrap ``model([{"image": image}])`` so it takes and returns flat tensors."""
    return TracingAdapter(model, [{"image": image}])


def export(cfg, image: torch.Tensor, fmt: str, output_dir: str) -> str:
    """Trace the model on ``image`` and write ``model.ts`` or ``model.onnx``; returns the path."""
    model = build_deploy_model(cfg)
    adapter = tracing_adapter(model, image.to(model.device))
    os.makedirs(output_dir, exist_ok=True)
    with torch.no_grad():
        if fmt == "torchscript":
            path = os.path.join(output_dir, "model.ts")
            traced = torch.jit.trace(adapter, (image,), check_trace=False)
            traced.save(path)
        else:
            register_onnx_symbolic()
            path = os.path.join(output_dir, "model.onnx")
            # the TorchScript-based exporter: detectron2's post-processing has data-dependent
            # shapes (score threshold, NMS) that it keeps dynamic
            torch.onnx.export(
                adapter,
                (image,),
                path,
                opset_version=ONNX_OPSET,
                dynamo=False,
                input_names=["image"],
                output_names=ONNX_OUTPUTS,
            )
    return path


def run_onnx(path: str, image: torch.Tensor):
    """The ONNX model's outputs (numpy arrays, ``ONNX_OUTPUTS`` order) on one image, by
    onnxruntime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {"image": image.cpu().numpy()})


def onnx_mismatch(path: str, cfg, image: torch.Tensor):
    """None if onnxruntime gives the eager model's detections on ``image``, else what differs."""
    model = build_deploy_model(cfg)
    with torch.no_grad():
        expected = [t.cpu().numpy() for t in tracing_adapter(model, image)(image)]
    got = run_onnx(path, image)
    for name, want, have in zip(ONNX_OUTPUTS, expected, got):
        if want.shape != have.shape:
            return f"{name}: shape {have.shape}, eager {want.shape}"
        atol = {"pred_boxes": ONNX_BOX_ATOL, "scores": ONNX_SCORE_ATOL}.get(name, 0)
        diff = float(np.abs(have.astype(np.float64) - want).max()) if want.size else 0.0
        if diff > atol:
            return f"{name}: max |difference| {diff:g} > {atol:g}"
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument(
        "--sample-image",
        help="an image to trace with; its size after resizing is the one the export is checked "
        "on (default: a random image of MIN_SIZE_TEST x MIN_SIZE_TEST)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE)")
    args = parser.parse_args()
    cfg = setup_cfg(args.config_file, args.opts)
    if args.sample_image:
        image_bgr = read_image(args.sample_image, format="BGR")
    else:
        size = cfg.INPUT.MIN_SIZE_TEST
        image_bgr = np.random.RandomState(0).randint(0, 256, (size, size, 3)).astype(np.uint8)
    image = preprocess(cfg, image_bgr)
    path = export(cfg, image, args.format, args.output)
    print(f"wrote {path} (traced on a {tuple(image.shape)} input)")
    if args.format == "onnx":
        mismatch = onnx_mismatch(path, cfg, image)
        if mismatch:
            raise SystemExit(f"{path}: onnxruntime differs from the eager model: {mismatch}")
        print(f"{path}: onnxruntime gives the eager model's detections on the sample image")


if __name__ == "__main__":
    cv2.setNumThreads(0)
    main()
