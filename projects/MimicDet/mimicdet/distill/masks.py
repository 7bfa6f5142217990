"""Which feature-map locations a distillation method imitates, per FPN level, for one image."""

import math
from typing import List, Sequence, Tuple

import torch
from detectron2.modeling.poolers import assign_boxes_to_levels
from detectron2.structures import Boxes, pairwise_iou
from torch import Tensor

__all__ = ["gt_levels", "fgfi_masks", "defeat_foreground_masks"]


def gt_levels(gt_boxes: Tensor, num_levels: int, scale: float = 56.0) -> Tensor:
    """
    The imitated level of each GT box by the rule of DeFeat's code, which its FGFI port shares
    (mmdetection's RoI rule, counted on the imitated levels): a box of size ``s = sqrt(w * h)``
    goes to level ``floor(log2(s / scale))`` from the finest, clamped to ``[0, num_levels - 1]``.
    With 56, boxes under 112 px go to the finest level, 112-224 px to the next.

    Returns:
        ``(G,)`` int64 level indices, 0 the finest.
    """
    # detectron2's rule at a canonical level 0: floor(0 + log2(s / scale)), clamped
    return assign_boxes_to_levels([Boxes(gt_boxes)], 0, num_levels - 1, scale, 0)


def fgfi_masks(
    anchors: Sequence[Tensor],
    grid_sizes: Sequence[Tuple[int, int]],
    gt_boxes: Tensor,
    psi: float = 0.5,
    level_scale: float = 56.0,
) -> List[Tensor]:
    """
    FGFI's near-object imitation mask (Wang et al., CVPR 2019), on an FPN as the DeFeat
    repository's port computes it: each GT belongs to one level (:func:`gt_levels`); there its
    threshold is ``psi`` times its largest IoU with that level's anchors, and a location is in
    the mask if any of its anchors exceeds the threshold of any GT of the level.

    Args:
        anchors: per level ``(H * W * A, 4)`` XYXY anchors in detectron2's order (row, column,
            anchor), as ``DefaultAnchorGenerator`` returns them.
        grid_sizes: per level ``(H, W)``.
        gt_boxes: ``(G, 4)`` XYXY.
        psi: the paper's threshold factor (0.5).
        level_scale: :func:`gt_levels`'s ``scale``.

    Returns:
        per level, an ``(H, W)`` bool mask.
    """
    levels = gt_levels(gt_boxes, len(anchors), level_scale)
    masks = []
    for level, (a, (h, w)) in enumerate(zip(anchors, grid_sizes)):
        own = gt_boxes[levels == level]
        if len(own) == 0:
            masks.append(torch.zeros(h, w, dtype=torch.bool, device=gt_boxes.device))
            continue
        iou = pairwise_iou(Boxes(a), Boxes(own))  # (H*W*A, G of this level)
        # strictly above, as the authors' code: a GT no anchor overlaps marks nothing
        near = iou > psi * iou.max(dim=0).values[None, :]
        masks.append(near.any(dim=1).view(h, w, -1).any(dim=2))
    return masks


def defeat_foreground_masks(
    gt_boxes: Tensor,
    grid_sizes: Sequence[Tuple[int, int]],
    strides: Sequence[int],
    level_scale: float = 56.0,
) -> List[Tensor]:
    """
    DeFeat's foreground mask (Guo et al., CVPR 2021): each GT on one FPN level
    (:func:`gt_levels`) marks the cells its box covers on that level; everything else is
    background.

    Args:
        gt_boxes: ``(G, 4)`` XYXY in image pixels.
        grid_sizes: per level ``(H, W)``, finest first.
        strides: per level stride, finest first.
        level_scale: :func:`gt_levels`'s ``scale``.

    Returns:
        per level, an ``(H, W)`` float mask of 0 and 1. The box's cells are those of the authors'
        code: columns ``floor(x0 / s) .. floor(x1 / s) - 1`` and rows alike (the cell under its
        far edge left out), or, for a box inside one cell's span in either direction, the one
        cell at its near corner.
    """
    device = gt_boxes.device
    masks = [torch.zeros(h, w, device=device) for h, w in grid_sizes]
    if len(gt_boxes) == 0:
        return masks
    levels = gt_levels(gt_boxes, len(grid_sizes), level_scale)
    for box, level in zip(gt_boxes.tolist(), levels.tolist()):
        stride, (h, w) = strides[level], grid_sizes[level]
        x0 = min(max(0, math.floor(box[0] / stride)), w - 1)
        y0 = min(max(0, math.floor(box[1] / stride)), h - 1)
        x1, y1 = min(w, math.floor(box[2] / stride)), min(h, math.floor(box[3] / stride))
        if x1 <= x0 or y1 <= y0:
            masks[level][y0, x0] = 1.0
        else:
            masks[level][y0:y1, x0:x1] = 1.0
    return masks
