#!/usr/bin/env python
"""
Which pyramid levels train on COCO-sized objects: the refinement's level rules side by side with
detectron2's RetinaNet matcher, on boxes drawn with COCO's size mix (41% small, 34% medium, 25%
large) on 800x1333 images.

    python tools/level_assignment_stats.py                   # 100 images of 10 boxes, the table
    python tools/level_assignment_stats.py --images 1 --boxes-per-image 1000 --json out.json

Per level P3..P7 and detector it prints the share of GTs the level trains (a GT whose scale
ranges overlap two levels counts on both; for RetinaNet, a GT counts on every level holding one
of its positive anchors) and the share of all positive anchors on the level, and, per detector,
the share of GTs left without any positive anchor. The MimicDet rows use the R-50 config's
anchors (4 x stride); RetinaNet's come from detectron2's retinanet_R_50_FPN_1x.yaml.
"""

import argparse
import json
import os
import sys

import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.model_zoo import get_config_file
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.matcher import Matcher
from detectron2.structures import Boxes, Instances, pairwise_iou

from mimicdet import get_mimicdet_cfg
from mimicdet.data.synthetic_coco import coco_like_boxes
from mimicdet.modeling import RefinementModule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEVELS = [3, 4, 5, 6, 7]
# the refinement's rules compared, as config overrides
RULES = {
    "canonical (detectron2's RoI rule, before)": [
        "MODEL.MIMICDET.REFINE.LEVEL_ASSIGNMENT",
        "canonical",
    ],
    "anchor_scale, half width 0.5 (default)": [
        "MODEL.MIMICDET.REFINE.SCALE_RANGE_HALF_WIDTH",
        "0.5",
    ],
    "anchor_scale, half width 1.0 (FoveaBox)": [
        "MODEL.MIMICDET.REFINE.SCALE_RANGE_HALF_WIDTH",
        "1.0",
    ],
}


def _features(image_size):
    height, width = image_size
    return [torch.zeros(1, 1, -(-height // 2**lvl), -(-width // 2**lvl)) for lvl in LEVELS]


def _summary(gt_levels, pos_levels):
    """Shares per level from ``(G, L)`` bool "GT trains on level" and positive-anchor levels."""
    per_level = torch.bincount(pos_levels, minlength=len(LEVELS)).float()
    return {
        "gt_share": {
            f"p{lvl}": gt_levels[:, i].float().mean().item() for i, lvl in enumerate(LEVELS)
        },
        "positive_anchor_share": {
            f"p{lvl}": (per_level[i] / per_level.sum().clamp(min=1)).item()
            for i, lvl in enumerate(LEVELS)
        },
        "positive_anchors": {f"p{lvl}": int(per_level[i]) for i, lvl in enumerate(LEVELS)},
        "gts_without_positive": 1.0 - gt_levels.any(dim=1).float().mean().item(),
        "num_gt": len(gt_levels),
    }


def _refinement(opts):
    cfg = get_mimicdet_cfg(os.path.join(REPO, "configs", "Base-MimicDet.yaml"), opts)
    return RefinementModule(cfg, [ShapeSpec(channels=1, stride=2**lvl) for lvl in LEVELS])


def mimicdet_levels(images, image_size, opts):
    """The refinement's labels for each image's boxes, under a config with ``opts``."""
    refinement = _refinement(opts)
    anchors, anchor_levels = refinement.anchors(_features(image_size))
    gt_levels, pos_levels = [], []
    for boxes in images:
        labels, matched = refinement.label_anchors(
            anchors, anchor_levels, [Instances(image_size, gt_boxes=Boxes(boxes))]
        )
        positive = labels[0] == 1
        # which GT each positive anchor trains: the matched box (the smallest claiming GT)
        owner = (matched[0][positive][:, None] == boxes[None]).all(dim=2).float().argmax(dim=1)
        trained = torch.zeros(len(boxes), len(LEVELS), dtype=torch.bool)
        trained[owner, anchor_levels[positive] - LEVELS[0]] = True
        gt_levels.append(trained)
        pos_levels.append(anchor_levels[positive] - LEVELS[0])
    return _summary(torch.cat(gt_levels), torch.cat(pos_levels))


def retinanet_levels(images, image_size):
    """detectron2 RetinaNet's anchors and matcher on each image's boxes."""
    cfg = get_cfg()
    cfg.merge_from_file(get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
    shapes = [ShapeSpec(channels=1, stride=2**lvl) for lvl in LEVELS]
    anchors = build_anchor_generator(cfg, shapes)(_features(image_size))
    anchor_levels = torch.cat([torch.full((len(a),), i) for i, a in enumerate(anchors)])
    anchors = Boxes.cat(anchors)
    matcher = Matcher(
        cfg.MODEL.RETINANET.IOU_THRESHOLDS,
        cfg.MODEL.RETINANET.IOU_LABELS,
        allow_low_quality_matches=True,
    )
    gt_levels, pos_levels = [], []
    for boxes in images:
        matched, labels = matcher(pairwise_iou(Boxes(boxes), anchors))
        positive = labels == 1
        trained = torch.zeros(len(boxes), len(LEVELS), dtype=torch.bool)
        trained[matched[positive], anchor_levels[positive]] = True
        gt_levels.append(trained)
        pos_levels.append(anchor_levels[positive])
    return _summary(torch.cat(gt_levels), torch.cat(pos_levels))


def level_stats(num_images=100, boxes_per_image=10, image_size=(800, 1333), seed=0):
    """Every rule of :data:`RULES` and RetinaNet on the same COCO-like boxes."""
    images = [
        torch.from_numpy(coco_like_boxes(boxes_per_image, image_size, seed=seed * 100000 + i))
        for i in range(num_images)
    ]
    stats = {name: mimicdet_levels(images, image_size, opts) for name, opts in RULES.items()}
    stats["detectron2 RetinaNet (IoU matcher, 9 anchors)"] = retinanet_levels(images, image_size)
    return stats


def format_table(stats) -> str:
    head = (
        "| detector / rule | "
        + " | ".join(f"P{lvl}" for lvl in LEVELS)
        + " | GTs with no positive |"
    )
    lines = [
        "Share of GTs trained on each level (share of positive anchors in brackets)",
        "",
        head,
        "|---" * (len(LEVELS) + 2) + "|",
    ]
    for name, s in stats.items():
        gts, anchors = s["gt_share"], s["positive_anchor_share"]
        cells = [f"{100 * gts[f'p{k}']:.1f}% ({100 * anchors[f'p{k}']:.1f}%)" for k in LEVELS]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {100 * s['gts_without_positive']:.1f}% |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100, help="images (default 100)")
    parser.add_argument("--boxes-per-image", type=int, default=10, help="GT boxes per image")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    if args.images < 1 or args.boxes_per_image < 1:
        sys.exit(
            f"--images and --boxes-per-image must be at least 1, got {args.images}, "
            f"{args.boxes_per_image}"
        )
    size = (args.height, args.width)
    stats = level_stats(args.images, args.boxes_per_image, size, args.seed)
    print(
        f"{args.images} image(s) of {args.height}x{args.width}, {args.boxes_per_image} COCO-like "
        f"boxes each, seed {args.seed}\n"
    )
    print(format_table(stats))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(stats, f, indent=2)
    return stats


if __name__ == "__main__":
    main()
