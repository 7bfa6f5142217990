"""Which feature-map locations a distillation method imitates, per FPN level, for one image."""

import math
from typing import List, Sequence, Tuple

import torch
from detectron2.modeling.poolers import assign_boxes_to_levels
from detectron2.structures import Boxes, pairwise_iou
from torch import Tensor

__all__ = ["fgfi_masks", "defeat_foreground_masks"]


def fgfi_masks(
    anchors: Sequence[Tensor],
    grid_sizes: Sequence[Tuple[int, int]],
    gt_boxes: Tensor,
    psi: float = 0.5,
    per_level_threshold: bool = False,
) -> List[Tensor]:
    """
    FGFI's near-object imitation mask (Wang et al., CVPR 2019). For each GT, the threshold is
    ``psi`` times its largest IoU with any anchor; a location is in the mask if any of its
    anchors reaches the threshold of any GT.

    Args:
        anchors: per level ``(H * W * A, 4)`` XYXY anchors in detectron2's order (row, column,
            anchor), as ``DefaultAnchorGenerator`` returns them.
        grid_sizes: per level ``(H, W)``.
        gt_boxes: ``(G, 4)`` XYXY.
        psi: the paper's threshold factor (0.5).
        per_level_threshold: False (default, ours): a GT's largest IoU is taken over all levels,
            so it marks only the levels whose anchors come near its best match; True: over each
            level's anchors separately, so every GT marks every level. The authors' code had one
            feature map; an FPN needs one of these two readings.

    Returns:
        per level, an ``(H, W)`` bool mask.
    """
    if len(gt_boxes) == 0:
        return [torch.zeros(h, w, dtype=torch.bool, device=gt_boxes.device) for h, w in grid_sizes]
    ious = [pairwise_iou(Boxes(a), Boxes(gt_boxes)) for a in anchors]  # (H*W*A, G) per level
    if per_level_threshold:
        best = [iou.max(dim=0).values for iou in ious]
    else:
        overall = torch.stack([iou.max(dim=0).values for iou in ious]).max(dim=0).values
        best = [overall] * len(ious)
    masks = []
    for iou, gt_best, (h, w) in zip(ious, best, grid_sizes):
        near = iou >= psi * gt_best[None, :]
        # a GT no anchor overlaps has threshold 0, which every anchor would pass: skip it
        near &= (gt_best > 0)[None, :]
        masks.append(near.any(dim=1).view(h, w, -1).any(dim=2))
    return masks


def defeat_foreground_masks(
    gt_boxes: Tensor,
    grid_sizes: Sequence[Tuple[int, int]],
    strides: Sequence[int],
    canonical_box_size: int = 224,
    canonical_level: int = 4,
) -> List[Tensor]:
    """
    DeFeat's foreground mask (Guo et al., CVPR 2021): each GT on one FPN level, chosen by the
    RoI level rule (detectron2's ``assign_boxes_to_levels``), marks the cells its box covers on
    that level; everything else is background.

    Args:
        gt_boxes: ``(G, 4)`` XYXY in image pixels.
        grid_sizes: per level ``(H, W)``, finest first.
        strides: per level stride, finest first (consecutive powers of two).
        canonical_box_size, canonical_level: the level rule's constants (224 at level 4).

    Returns:
        per level, an ``(H, W)`` float mask of 0 and 1. A cell is foreground if it overlaps the
        box, i.e. columns ``floor(x0 / s) .. ceil(x1 / s) - 1`` (default, ours: the paper says
        "the box region" without a rounding rule).
    """
    device = gt_boxes.device
    masks = [torch.zeros(h, w, device=device) for h, w in grid_sizes]
    if len(gt_boxes) == 0:
        return masks
    min_level = int(math.log2(strides[0]))
    max_level = int(math.log2(strides[-1]))
    levels = assign_boxes_to_levels(
        [Boxes(gt_boxes)], min_level, max_level, canonical_box_size, canonical_level
    )
    for box, level in zip(gt_boxes.tolist(), levels.tolist()):
        stride, (h, w) = strides[level], grid_sizes[level]
        x0, y0 = max(0, math.floor(box[0] / stride)), max(0, math.floor(box[1] / stride))
        x1, y1 = min(w, math.ceil(box[2] / stride)), min(h, math.ceil(box[3] / stride))
        masks[level][y0:y1, x0:x1] = 1.0
    return masks
