#!/usr/bin/env python
"""
Run a detector checkpoint on images and write them with the predicted boxes drawn, in the style of
detectron2's ``demo/demo.py``. Works with yaml and LazyConfig ``.py`` configs; CPU by default.

    python tools/demo.py --config-file configs/DeepForest/mimicdet_MNV2_FPN.yaml \\
        --input datasets/deepforest/val --output output/demo/pictures \\
        --opts MODEL.WEIGHTS output/demo/model_deploy.pth
"""

import argparse
import ctypes
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer
from PIL import Image

from mimicdet import WeightsOnlyCheckpointer, get_mimicdet_cfg

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
logger = logging.getLogger("mimicdet.demo")


class Predictor:
    """
    detectron2's ``DefaultPredictor`` for yaml and LazyConfig configs alike: one BGR ``(H, W, 3)``
    uint8 image in, the model's ``Instances`` (in input pixels) out.
    """

    def __init__(self, config_file, opts=(), device="cpu"):
        opts = list(opts)
        if str(config_file).endswith(".py"):
            # LazyConfig overrides are "key=value"; MODEL.WEIGHTS is accepted as for yaml
            weights = _opt(opts, "MODEL.WEIGHTS", None)
            overrides = [o for o in opts if "=" in o]
            cfg = LazyConfig.apply_overrides(LazyConfig.load(str(config_file)), overrides)
            self.model = instantiate(cfg.model)
            weights = weights if weights is not None else cfg.train.init_checkpoint
            resize = cfg.dataloader.test.mapper.augmentations[0]
            self.aug = T.ResizeShortestEdge(resize.short_edge_length, resize.max_size)
            self.input_format = cfg.dataloader.test.mapper.image_format
            dataset = cfg.dataloader.test.dataset.names
            self.dataset = dataset if isinstance(dataset, str) else dataset[0]
        else:
            cfg = get_mimicdet_cfg(config_file, opts)
            cfg.MODEL.DEVICE = device
            self.model = build_model(cfg)
            weights = cfg.MODEL.WEIGHTS
            self.aug = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
            self.input_format = cfg.INPUT.FORMAT
            self.dataset = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None
        self.model.to(device).eval()
        if weights:
            WeightsOnlyCheckpointer(self.model).load(weights)
        else:
            logger.warning("No MODEL.WEIGHTS given: the model runs with its initial weights")
        self.metadata = MetadataCatalog.get(self.dataset or "__unused")

    def inputs(self, image_bgr):
        """The model's input dict for one BGR image: resized and in the format, as at test."""
        image = image_bgr[:, :, ::-1] if self.input_format == "RGB" else image_bgr
        height, width = image.shape[:2]
        resized = self.aug.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
        return {"image": tensor, "height": height, "width": width}

    @torch.no_grad()
    def __call__(self, image_bgr):
        return self.model([self.inputs(image_bgr)])[0]["instances"]


def _opt(opts, key, default):
    """The value of ``key`` in a ``KEY VALUE ...`` list, else ``default``."""
    pairs = dict(zip(opts[::2], opts[1::2]))
    return pairs.get(key, default)


def draw(image_bgr, instances, metadata, confidence_threshold):
    """The image (RGB ``(H, W, 3)`` uint8) with boxes scoring at least the threshold drawn."""
    instances = instances.to("cpu")
    instances = instances[instances.scores >= confidence_threshold]
    visualizer = Visualizer(image_bgr[:, :, ::-1], metadata)
    return visualizer.draw_instance_predictions(instances).get_image()


def list_images(inputs):
    """Image files named by ``inputs`` (files or folders); raises FileNotFoundError if one is
    missing or none is found."""
    paths = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"--input {item}: no such file or folder")
    if not paths:
        raise FileNotFoundError(f"--input {' '.join(inputs)}: no images ({sorted(IMAGE_SUFFIXES)})")
    return paths


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="a yaml or LazyConfig .py config")
    parser.add_argument("--input", nargs="+", required=True, help="images and/or folders")
    parser.add_argument("--output", required=True, help="folder for the pictures (created)")
    parser.add_argument("--confidence-threshold", type=float, default=0.3)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="yaml: KEY VALUE pairs; .py: key=value; both: MODEL.WEIGHTS <checkpoint>",
    )
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="mimicdet")
    try:
        paths = list_images(args.input)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    predictor = Predictor(args.config_file, args.opts, device=args.device)
    for path, out, kept in predict_folder(predictor, paths, args.output, args.confidence_threshold):
        print(f"{path}: {kept} detections >= {args.confidence_threshold} -> {out}")


def predict_folder(predictor, paths, output, confidence_threshold):
    """
    Runs ``predictor`` on each image and writes it with its boxes to ``output``/<stem>.png.

    Yields, after each image is written: its path, the picture's path and the number of boxes
    drawn (tools/soak_demo.py measures memory between images through this loop).
    """
    os.makedirs(output, exist_ok=True)
    for path in paths:
        image = read_image(str(path), format="BGR")
        instances = predictor(image)
        picture = draw(image, instances, predictor.metadata, confidence_threshold)
        out = Path(output) / (Path(path).stem + ".png")
        Image.fromarray(np.ascontiguousarray(picture)).save(out)
        kept = int((instances.scores >= confidence_threshold).sum())
        del image, instances, picture
        release_freed_memory()
        yield path, out, kept


def release_freed_memory():
    """
    Hands memory freed by the last image back to the OS (glibc's ``malloc_trim``; a no-op
    elsewhere). Images of varying sizes otherwise leave glibc's heap fragmented: over a folder of
    150 tiles of varied sizes RSS grew 26% after the warm-up without it, in steps, with no leak
    behind it (tools/soak_demo.py; issue 6's note).
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # glibc only
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


if __name__ == "__main__":
    main()
