"""
detectron2's FCOS with its box outputs in float32, so that it trains under mixed precision.

detectron2's ``Box2BoxTransformLinear`` decodes boxes in the dtype of the box outputs (RetinaNet's
``Box2BoxTransform`` casts them to float32 first). Under float16 autocast FCOS's GIoU loss then
meets float16 boxes and float32 ground truth, and fvcore's ``giou_loss`` fails with "Index put
requires the source and destination dtypes match" (found on an H200, 2026-12-04; CPU bfloat16
autocast takes the same path). At inference the same decoding would put 1000 px boxes on a 0.5 px
float16 grid. The baseline configs name this class; in float32 it computes exactly what detectron2's
FCOS does, and its weights are the same keys.
"""

from typing import List

import torch
from detectron2.modeling.meta_arch.fcos import FCOS

__all__ = ["Float32BoxFCOS"]


class Float32BoxFCOS(FCOS):
    """detectron2's :class:`FCOS`, its per-level box outputs cast to float32 before they are
    decoded, in training (losses) and inference (boxes) alike."""

    def forward_training(self, images, features, predictions, gt_instances):
        return super().forward_training(
            images, features, _float32_box_outputs(predictions), gt_instances
        )

    def forward_inference(self, images, features, predictions):
        return super().forward_inference(images, features, _float32_box_outputs(predictions))


def _float32_box_outputs(predictions: List[List[torch.Tensor]]) -> List[List[torch.Tensor]]:
    """FCOSHead's ``[logits, box outputs, centerness]`` (each a list over levels of (N, C, H, W))
    with the box outputs in float32; a no-op outside autocast."""
    logits, box_outputs, centerness = predictions
    return [logits, [x.float() for x in box_outputs], centerness]
