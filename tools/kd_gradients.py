#!/usr/bin/env python
"""
How hard each loss of a distilled dense student pulls on its classifier: per training loss
(the student's own and every enabled ``loss_kd_*``, after its weight), the norm of its gradient
on the student's class branch (the class tower and the classifier conv) and on its backbone with
the FPN, and the cosine of every two gradients (negative: the terms pull apart).

A KD term whose gradient dwarfs the student's own classification loss on the class branch steers
the classifier rather than guiding it. This measures it on training batches of a Distiller (its
training forward, one backward pass per loss, no step taken), at a checkpoint or at the start:

    python tools/kd_gradients.py --config-file output/.../config.yaml --batches 4 \\
        MODEL.WEIGHTS output/.../model_0001199.pth MODEL.DISTILL.RANK.SCORE logit
"""

import sys
from pathlib import Path

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "projects" / "MimicDet"))
from mimic_agreement import (  # noqa: E402
    distiller_tool_main,
    gradient_statistics,
    mean_over_batches,
    training_batches,
)


def class_branch_groups(student):
    """``class_branch``: a dense head's class tower and classifier (what the class logits are made
    by after the pyramid); ``backbone``: the backbone with its FPN."""
    head = getattr(student, "head", None)
    if not (hasattr(head, "cls_subnet") and hasattr(head, "cls_score")):
        raise SystemExit(
            f"tools/kd_gradients.py measures a dense student (RetinaNet, FCOS); the student is "
            f"{type(student).__name__}"
        )
    return {
        "class_branch": [*head.cls_subnet.parameters(), *head.cls_score.parameters()],
        "backbone": [p for p in student.backbone.parameters() if p.requires_grad],
    }


def readings(cfg):
    """What the result records of the terms' settings: their gradients depend on them."""
    return {
        "rank_score": cfg.MODEL.DISTILL.RANK.SCORE,
        "pfi_prediction_gap": cfg.MODEL.DISTILL.PFI.PREDICTION_GAP,
    }


def measure(cfg, batches, seed=0):
    """Means of ``gradient_statistics`` over ``batches`` training batches of ``cfg``'s Distiller,
    loaded from ``cfg.MODEL.WEIGHTS`` (none: the student as it starts), and the losses."""
    if cfg.MODEL.META_ARCHITECTURE != "Distiller":
        raise SystemExit(
            f"tools/kd_gradients.py measures a Distiller's terms; this config has "
            f"{cfg.MODEL.META_ARCHITECTURE}"
        )
    seed_all_rng(seed)
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.train()
    groups = class_branch_groups(model.student)
    records, losses = [], []
    # the iteration only decides the KD warm-up: past it, every term counts
    with EventStorage(start_iter=cfg.MODEL.DISTILL.WARMUP_ITERS):
        for batch in training_batches(cfg, batches, seed):
            step = model(batch)
            names = [k for k in step if k.startswith("loss_") and step[k].requires_grad]
            records.append(gradient_statistics(step, groups, names))
            losses.append({k: v.item() for k, v in step.items()})
    result = {key: mean_over_batches(records, key) for key in records[0]}
    result["losses"] = {key: mean_over_batches(losses, key) for key in losses[0]}
    return result


def main(argv=None):
    return distiller_tool_main(argv, __doc__, measure, readings)


if __name__ == "__main__":
    main(sys.argv[1:])
