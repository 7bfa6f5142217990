"""Which pyramid levels a GT box trains on: by its scale, matched to the refinement's anchors."""

import math
from typing import List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling.poolers import assign_boxes_to_levels
from detectron2.structures import Boxes
from torch import Tensor

__all__ = ["LevelAssigner"]

_RULES = ("anchor_scale", "canonical")


class LevelAssigner:
    """
    Assigns GT boxes to the dense levels (e.g. P3..P7) by their scale ``s = sqrt(area)``.

    ``"anchor_scale"`` (the default): level ``l`` has a scale range centred, in log scale, on its
    anchor side ``a_l``; a box is valid on every level with ``|log2(s / a_l)| <= half_width``
    (left-closed, so that touching ranges share no box), and boxes outside all ranges go to the
    finest or the coarsest level. ``half_width`` 0.5 gives one octave per level, adjacent and
    disjoint, so every box trains on exactly one level; 1.0 gives FoveaBox's overlapping
    ``[a_l / 2, 2 a_l]``.

    ``"canonical"``: detectron2's RoI-pooler rule (``assign_boxes_to_levels``), one level per box,
    ``floor(canonical_level + log2(s / canonical_box_size))``. It was made for RoI pooling on
    P2..P5; with 4 x stride anchors on P3..P7 it leaves P6 and P7 without positives on COCO.
    """

    @configurable
    def __init__(
        self,
        *,
        levels: List[int],
        rule: str = "anchor_scale",
        anchor_sizes: Optional[List[float]] = None,
        scale_range_half_width: float = 0.5,
        canonical_box_size: float = 224.0,
        canonical_level: int = 4,
    ):
        """
        Args:
            levels: the dense pyramid levels, fine to coarse, consecutive, e.g. ``[3, ..., 7]``.
            rule: ``"anchor_scale"`` or ``"canonical"`` (see the class docstring).
            anchor_sizes: the anchor side of each level, in pixels (``"anchor_scale"`` only).
            scale_range_half_width: half-width of each level's scale range, in octaves.
            canonical_box_size, canonical_level: the ``"canonical"`` rule's parameters.
        """
        if rule not in _RULES:
            raise ValueError(f"Unknown level assignment rule '{rule}'; expected one of {_RULES}")
        if list(levels) != list(range(levels[0], levels[0] + len(levels))):
            raise ValueError(f"Dense levels must be consecutive, got {levels}")
        if rule == "anchor_scale":
            if (
                anchor_sizes is None
                or len(anchor_sizes) != len(levels)
                or not all(
                    math.isclose(a, anchor_sizes[0] * 2**i) for i, a in enumerate(anchor_sizes)
                )
            ):
                # one anchor side per level, doubling with the stride (the refinement's anchors)
                raise ValueError(
                    f"anchor_sizes must give one size per level {levels}, doubling from level to "
                    f"level, got {anchor_sizes}"
                )
            if scale_range_half_width < 0.5:
                # narrower ranges than one octave per level would leave scales no level trains on
                raise ValueError(
                    f"scale_range_half_width {scale_range_half_width} < 0.5 leaves gaps between "
                    "the levels' scale ranges"
                )
        self.levels = list(levels)
        self.rule = rule
        self.anchor_sizes = None if anchor_sizes is None else [float(a) for a in anchor_sizes]
        self.scale_range_half_width = scale_range_half_width
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level

    @classmethod
    def from_config(cls, cfg):
        rcfg = cfg.MODEL.MIMICDET.REFINE
        levels = [int(f[1:]) for f in rcfg.IN_FEATURES]
        return {
            "levels": levels,
            "rule": rcfg.LEVEL_ASSIGNMENT,
            "anchor_sizes": [rcfg.ANCHOR_SIZE_PER_STRIDE * 2**lvl for lvl in levels],
            "scale_range_half_width": rcfg.SCALE_RANGE_HALF_WIDTH,
            "canonical_box_size": rcfg.CANONICAL_BOX_SIZE,
            "canonical_level": rcfg.CANONICAL_LEVEL,
        }

    def __repr__(self):
        if self.rule == "canonical":
            return (
                f"LevelAssigner(levels={self.levels}, rule=canonical, "
                f"canonical_box_size={self.canonical_box_size}, "
                f"canonical_level={self.canonical_level})"
            )
        return (
            f"LevelAssigner(levels={self.levels}, rule=anchor_scale, "
            f"anchor_sizes={self.anchor_sizes}, half_width={self.scale_range_half_width})"
        )

    def __eq__(self, other):
        return isinstance(other, LevelAssigner) and vars(self) == vars(other)

    def _log_scale(self, boxes: Tensor) -> Tensor:
        """``(M, L)``: ``log2(s / a_l)`` of each box against each level's anchor side."""
        sizes = Boxes(boxes).area().clamp(min=1e-12).sqrt()
        anchors = boxes.new_tensor(self.anchor_sizes)
        return torch.log2(sizes[:, None] / anchors[None])

    def nearest_levels(self, boxes: Tensor) -> Tensor:
        """
        The one level each box belongs to most: the level whose scale range holds it with half
        width 0.5 (the nearest anchor side in log scale), or the canonical rule's level.

        Args:
            boxes: ``(M, 4)`` XYXY.

        Returns:
            ``(M,)`` int64 pyramid levels (e.g. 3 for P3), not offsets.
        """
        if self.rule == "canonical":
            offsets = assign_boxes_to_levels(
                [Boxes(boxes)],
                self.levels[0],
                self.levels[-1],
                self.canonical_box_size,
                self.canonical_level,
            )
        else:
            offsets = torch.floor(self._log_scale(boxes)[:, 0] + 0.5)
            offsets = offsets.clamp(min=0, max=len(self.levels) - 1).to(torch.int64)
        return offsets + self.levels[0]

    def level_mask(self, boxes: Tensor) -> Tensor:
        """
        Args:
            boxes: ``(M, 4)`` XYXY.

        Returns:
            ``(M, L)`` bool: box ``i`` trains on ``self.levels[j]``. Every row has at least one
            True; exactly one with the canonical rule or a half width of 0.5.
        """
        if self.rule == "canonical" or math.isclose(self.scale_range_half_width, 0.5):
            offsets = self.nearest_levels(boxes) - self.levels[0]
            return offsets[:, None] == torch.arange(len(self.levels), device=boxes.device)[None]
        scale = self._log_scale(boxes)
        half = self.scale_range_half_width
        mask = (scale >= -half) & (scale < half)
        mask[:, 0] |= scale[:, 0] < -half
        mask[:, -1] |= scale[:, -1] >= half
        return mask
