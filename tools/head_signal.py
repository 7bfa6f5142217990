#!/usr/bin/env python
"""
How much of the image reaches a dense head's classifier: for a RetinaNet or FCOS config (yaml or
LazyConfig), the standard deviation of the features entering its class tower, after each of the
tower's ReLUs, and of the class logits over each image's positions (their mean, the prior's
-4.6 at initialization, says nothing about the image), on a few images of the config's test split.

A tower whose signal shrinks layer by layer gives every position nearly the same logits, and its
first convs nearly no gradient: that is how detectron2's RetinaNet head (no norm, std-0.01 convs)
started on the benchmark's 128-channel FPN, before its GroupNorm (docs/benchmark_log.md).

    python tools/head_signal.py --config-file configs/FashionScenes/retinanet_MNV2_FPN.yaml
    python tools/head_signal.py --config-file configs/FashionScenes/retinanet_MNV2_FPN.yaml \
        MODEL.RETINANET.NORM ""
    python tools/head_signal.py --config-file configs/FashionScenes/fcos_MNV2_FPN.py \
        --weights output/fashion_scenes/fcos_MNV2_FPN/model_final.pth
"""

import argparse
import shlex
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "projects" / "MimicDet"))
sys.path.insert(0, str(REPO / "tools"))


def tower_signal(model, images):
    """{level: (feature std, [std after each ReLU], std of the logits over positions)} for
    ``images``, CHW tensors as the model takes them at test."""
    head = getattr(model, "head", None)
    if not hasattr(head, "cls_subnet"):
        raise SystemExit(f"{type(model).__name__} has no dense head with a cls_subnet tower")
    with torch.no_grad():
        batch = model.preprocess_image([{"image": image} for image in images])
        features = model.backbone(batch.tensor)
        signal = {}
        for level in model.head_in_features:
            x, after_relu = features[level], []
            feature_std = x.std().item()
            for layer in head.cls_subnet:
                x = layer(x)
                if isinstance(layer, torch.nn.ReLU):
                    after_relu.append(x.std().item())
            logits = head.cls_score(x)
            signal[level] = (feature_std, after_relu, logits.std(dim=(2, 3)).mean().item())
    return signal


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", default="", help="a checkpoint; none: the initialization")
    parser.add_argument("--images", type=int, default=2, help="test images (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="of the initialization")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    args = parser.parse_args(argv)

    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image

    from demo import Predictor  # builds yaml and LazyConfig models, loads weights weights-only

    if args.weights and not Path(args.weights).is_file():
        raise SystemExit(f"--weights {args.weights}: no such file")
    torch.manual_seed(args.seed)
    predictor = Predictor(args.config_file, args.opts + ["MODEL.WEIGHTS", args.weights])
    dicts = DatasetCatalog.get(predictor.dataset)[: args.images]
    images = [predictor.inputs(read_image(d["file_name"], "BGR"))["image"] for d in dicts]
    weights = args.weights or f"initialization (seed {args.seed})"
    print(
        f"{args.config_file} {shlex.join(args.opts)}: {weights}, {len(images)} "
        f"{predictor.dataset} images"
    )
    signal = tower_signal(predictor.model, images)
    for level, (feature_std, after_relu, logit_std) in signal.items():
        relus = " ".join(f"{s:.3g}" for s in after_relu)
        print(
            f"  {level}: features {feature_std:.3g} | after each ReLU {relus} | "
            f"logits over positions {logit_std:.3g}"
        )


if __name__ == "__main__":
    main()
