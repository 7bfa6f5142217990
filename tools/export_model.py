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
``--format torch_export`` writes ``model.pt2`` with ``torch.export`` (load it with
``torch.export.load`` after ``import torchvision``, whose ``nms`` it calls, and ``import
mimicdet.layers``; ``program.module()(image)`` runs it). ``--format torchscript`` writes
``model.ts`` (torch marks ``torch.jit.trace`` deprecated; it stays supported here).

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
import contextlib
import importlib.util
import os
import sys

import cv2
import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances

import mimicdet.layers  # noqa: F401 registers torch.ops.mimicdet for tracing
import mimicdet.modeling.meta_arch
from mimicdet import WeightsOnlyCheckpointer, get_mimicdet_cfg
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
    cfg = get_mimicdet_cfg(config_file, opts)
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


class ImageToDetections(torch.nn.Module):
    """
    The deploy model as ``image (3, H, W) -> (pred_boxes, pred_classes, scores, image_size)``,
    what the TracingAdapter's trace computes, for ``torch.export``: it normalizes and pads the
    image itself, with Python sizes, because detectron2's ``ImageList.from_tensors`` turns the
    shape into tensors and back, which an export sees as data-dependent.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        model = self.model
        height, width = image.shape[-2:]
        divisor = max(model.backbone.size_divisibility, 1)
        padded = (-(-height // divisor) * divisor, -(-width // divisor) * divisor)
        tensor = (image - model.pixel_mean) / model.pixel_std
        tensor = torch.nn.functional.pad(tensor, (0, padded[1] - width, 0, padded[0] - height))
        images = ImageList(tensor[None], [(height, width)])
        (result,) = model.forward_inference(images, model.backbone(images.tensor))
        result = detector_postprocess(result, height, width)
        size = torch.tensor([height, width])
        return result.pred_boxes.tensor, result.pred_classes, result.scores, size


@contextlib.contextmanager
def data_independent_structures():
    """
    While ``torch.export`` traces, detectron2's ``Boxes`` and ``Instances`` check in Python
    what a data-dependent number of boxes holds (an empty tensor, finite values, equal lengths)
    and its batched NMS branches on that number, none of which an export can keep. Inside this
    context they do the same arithmetic without those checks, and torchvision's NMS may keep any
    number of boxes; everything is restored on exit.
    """

    def boxes_init(self, tensor):
        self.tensor = torch.as_tensor(tensor, dtype=torch.float32).reshape(-1, 4)

    def boxes_clip(self, box_size):
        height, width = box_size
        x1, y1, x2, y2 = self.tensor.unbind(dim=-1)
        clipped = (x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height))
        self.tensor = torch.stack(clipped, dim=-1)

    def instances_set(self, name, value):
        self._fields[name] = value

    def batched_nms(boxes, scores, classes, iou_threshold):
        # torchvision's coordinate trick: classes shifted apart by the largest coordinate (with a
        # zero appended, so that no detection at all needs no branch)
        top = torch.cat([boxes.flatten(), boxes.new_zeros(1)]).max()
        shifted = boxes + (classes.to(boxes) * (top + 1))[:, None]
        return torch.ops.torchvision.nms(shifted, scores, iou_threshold)

    def nms_fake(boxes, scores, iou_threshold):
        # torchvision's own fake kernel promises at least 2 kept boxes (the deprecated
        # create_unbacked_symint's default), so an exported program would assert that at run
        # time and fail on an image with 0 or 1 detection
        return boxes.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.long)

    meta_arch = mimicdet.modeling.meta_arch
    saved = (Boxes.__init__, Boxes.clip, Instances.set, meta_arch.batched_nms)
    Boxes.__init__, Boxes.clip, Instances.set = boxes_init, boxes_clip, instances_set
    meta_arch.batched_nms = batched_nms
    library = torch.library.Library("torchvision", "FRAGMENT")
    torch.library.register_fake("torchvision::nms", nms_fake, lib=library)
    try:
        yield
    finally:
        Boxes.__init__, Boxes.clip, Instances.set, meta_arch.batched_nms = saved
        library._destroy()


def export(cfg, image: torch.Tensor, fmt: str, output_dir: str) -> str:
    """Export the model on ``image``: ``model.ts``, ``model.onnx`` or ``model.pt2``; returns the
    path."""
    model = build_deploy_model(cfg)
    adapter = tracing_adapter(model, image.to(model.device))
    os.makedirs(output_dir, exist_ok=True)
    if fmt == "torch_export":
        path = os.path.join(output_dir, "model.pt2")
        with torch.no_grad(), data_independent_structures():
            program = torch.export.export(ImageToDetections(model), (image,), strict=False)
        torch.export.save(program, path)
        return path
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
    parser.add_argument(
        "--format", choices=["torchscript", "onnx", "torch_export"], default="torchscript"
    )
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
