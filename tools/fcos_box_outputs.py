#!/usr/bin/env python
"""
How much of an FCOS checkpoint's box regression survives detectron2's ReLU.

detectron2's FCOS decodes its box outputs (the distances to a box's four sides) with
``Box2BoxTransformLinear.apply_deltas``, which applies a ReLU first. An output at or below zero
makes that side zero long and passes no gradient back. If nearly all outputs fall there early
in training, the regression branch cannot recover: its GIoU loss stays near 1 while
classification keeps learning, and AP stays at 0. This prints, for each checkpoint, the share
of box outputs above zero on the first val images, with their median and maximum.

    python tools/fcos_box_outputs.py \\
        output/benchmark/deepforest/fcos/lr0.01-radius2.5-seed1/model_final.pth \\
        output/benchmark/deepforest/fcos/lr0.01-radius2.5-seed2/model_final.pth
"""

import argparse
import sys
from itertools import islice
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def box_output_stats(model, batches):
    """The share of ``model``'s box-regression outputs above zero over ``batches`` (lists of
    detectron2 input dicts), with their median, maximum and count."""
    outputs = []
    model.eval()
    with torch.no_grad():
        for batch in batches:
            features = model.backbone(model.preprocess_image(batch).tensor)
            _, box_outputs, _ = model.head([features[name] for name in model.head_in_features])
            outputs += [level.flatten() for level in box_outputs]
    values = torch.cat(outputs)
    return {
        "above_zero": (values > 0).float().mean().item(),
        "median": values.median().item(),
        "max": values.max().item(),
        "count": values.numel(),
    }


def load_weights(model, path):
    """Loads every tensor of the checkpoint ``path`` into ``model``, or exits naming what failed."""
    from mimicdet.checkpoint import load_weights_strictly

    if not Path(path).is_file():
        sys.exit(f"{path}: no such checkpoint")
    try:
        load_weights_strictly(model, path, "FCOS model of --config")
    except ValueError as e:
        sys.exit(str(e))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="model_final.pth files of FCOS runs")
    parser.add_argument("--config", default="configs/DeepForest/fcos_MNV2_FPN.py")
    parser.add_argument("--images", type=int, default=5, help="val images looked at")
    parser.add_argument("--opts", nargs="*", default=[], help="config overrides, key=value")
    args = parser.parse_args(argv)

    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.apply_overrides(LazyConfig.load(str(REPO / args.config)), args.opts)
    batches = list(islice(instantiate(cfg.dataloader.test), args.images))
    for path in args.checkpoints:
        model = instantiate(cfg.model).to("cpu")
        load_weights(model, path)
        stats = box_output_stats(model, batches)
        print(
            f"{path}: {stats['above_zero']:.1%} of {stats['count']} box outputs above zero "
            f"(median {stats['median']:.2f}, max {stats['max']:.2f})"
        )


if __name__ == "__main__":
    main()
