#!/usr/bin/env python
"""
Where PFI's weight falls, on a checkpoint of a distilled student: inside the GT boxes or outside,
with the squared gap of logits and with the squared gap of probabilities
(``MODEL.DISTILL.PFI.PREDICTION_GAP``), whichever the checkpoint trained with.

PFI (Prediction-guided Feature Imitation) weighs each location's feature gap by how far the
teacher's and the student's predictions there differ. With an RPN teacher the logits compared are
calibrated apart, and the logit gap can weigh that offset rather than a disagreement; this tool
measures it on training batches (the Distiller's training forward, no step taken):

    python tools/pfi_weight.py --config-file output/.../config.yaml --batches 4 \\
        MODEL.WEIGHTS output/.../model_0001199.pth

Per gap, over the imitated levels and the batches: the mean weight inside and outside the GT boxes
(a cell is inside when its stride-sized square touches a box), the share of the weighted feature
gap that lies outside, and the PFI term it gives (unweighted by ``PFI.WEIGHT``); besides, the
teacher's and the student's mean logit outside the boxes, and the training forward's losses.
"""

import contextlib
import math
import sys
from pathlib import Path

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "projects" / "MimicDet"))
import mimicdet.distill.meta_arch as meta_arch  # noqa: E402
from mimicdet.distill import PFI_PREDICTION_GAPS, pfi_weight  # noqa: E402
from mimic_agreement import (  # noqa: E402
    distiller_tool_main,
    mean_over_batches,
    training_batches,
)


@contextlib.contextmanager
def recording_pfi_inputs(records):
    """Appends to ``records`` the (adapted student features, teacher features, student logits,
    teacher logits) of each PFI computation while the context is open."""
    compute = meta_arch.pfi_loss

    def record(student, teacher, student_logits, teacher_logits, *args):
        inputs = (student, teacher, student_logits, teacher_logits)
        records.append([[x.detach() for x in level] for level in inputs])
        return compute(student, teacher, student_logits, teacher_logits, *args)

    meta_arch.pfi_loss = record
    try:
        yield records
    finally:
        meta_arch.pfi_loss = compute


def inside_boxes(boxes, grid, stride):
    """``(H, W)`` bool: the cells of a level whose stride-sized square touches one of ``boxes``
    (``(R, 4)`` XYXY in input pixels)."""
    inside = torch.zeros(grid, dtype=torch.bool)
    for x0, y0, x1, y1 in (boxes / stride).tolist():
        inside[int(y0) : int(y1) + 1, int(x0) : int(x1) + 1] = True
    return inside


def masked_mean(values, mask):
    """The mean of ``values`` where ``mask`` holds, NaN where it holds nowhere (a coarse level
    whose every cell touches a box), which the means over levels leave out."""
    return values[mask].mean().item() if mask.any() else math.nan


def level_statistics(student, teacher, s_logits, t_logits, inside):
    """One level's values (averaged over levels and batches afterwards) of what the module
    docstring lists."""
    feature_gap = (student - teacher).pow(2).mean(dim=1)  # (N, H, W)
    outside = ~inside
    out = {
        "t_logit_outside": masked_mean(t_logits.permute(0, 2, 3, 1), outside),
        "s_logit_outside": masked_mean(s_logits.permute(0, 2, 3, 1), outside),
        "cells_inside": inside.float().mean().item(),
    }
    for gap in PFI_PREDICTION_GAPS:
        weight = pfi_weight(s_logits, t_logits, gap)
        weighted = weight * feature_gap
        out[f"{gap}_weight_inside"] = masked_mean(weight, inside)
        out[f"{gap}_weight_outside"] = masked_mean(weight, outside)
        out[f"{gap}_share_outside"] = (weighted[outside].sum() / weighted.sum()).item()
        out[f"{gap}_pfi"] = weighted.mean().item()
    return out


def measure(cfg, batches, seed=0):
    """The statistics of the module docstring over ``batches`` training batches of ``cfg``'s
    Distiller, loaded from ``cfg.MODEL.WEIGHTS``."""
    if cfg.MODEL.META_ARCHITECTURE != "Distiller" or cfg.MODEL.DISTILL.PFI.WEIGHT <= 0:
        raise SystemExit(
            "tools/pfi_weight.py measures a Distiller with PFI on (MODEL.DISTILL.PFI.WEIGHT > 0); "
            f"this config has {cfg.MODEL.META_ARCHITECTURE} with PFI weight "
            f"{cfg.MODEL.DISTILL.PFI.WEIGHT}"
        )
    seed_all_rng(seed)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.train()
    shapes = model.student.backbone.output_shape()
    strides = [shapes[f].stride for f in model.kd_adapters]
    per_level, losses = [], []
    with recording_pfi_inputs([]) as records, EventStorage(), torch.no_grad():
        for batch in training_batches(cfg, batches, seed):
            records.clear()
            losses.append({k: v.item() for k, v in model(batch).items()})
            levels = zip(*records[0], strides)
            for student, teacher, s_logits, t_logits, stride in levels:
                grid = tuple(student.shape[-2:])
                inside = torch.stack(
                    [inside_boxes(x["instances"].gt_boxes.tensor, grid, stride) for x in batch]
                )
                per_level.append(level_statistics(student, teacher, s_logits, t_logits, inside))
    result = {key: mean_over_batches(per_level, key) for key in per_level[0]}
    result["losses"] = {key: mean_over_batches(losses, key) for key in losses[0]}
    result["trained_with"] = cfg.MODEL.DISTILL.PFI.PREDICTION_GAP
    return result


def main(argv=None):
    return distiller_tool_main(argv, __doc__, measure, lambda cfg: {})


if __name__ == "__main__":
    main(sys.argv[1:])
