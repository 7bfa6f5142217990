"""The dual-path cosine mimic loss between the S-head and the T-head."""

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import cat, nonzero_tuple
from detectron2.structures import Instances
from torch import Tensor, nn

__all__ = [
    "DualPathMimicLoss",
    "cosine_mimic_loss",
    "sample_mimic_boxes",
    "student_at_anchors",
    "teacher_at_boxes",
    "dual_path_mimic_losses",
]

# the Instances field that holds the T-head's side of each path
_TEACHER_FIELDS = {"cls": "teacher_cls_logits", "reg": "teacher_reg_feats"}


def cosine_mimic_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """
    ``mean(1 - cos(student_i, teacher_i))`` over rows: 0 for identical, 2 for opposite features.

    Args:
        student, teacher: ``(M, D)``.

    Returns:
        a scalar; 0 (still connected to ``student``) when ``M == 0``.
    """
    if student.numel() == 0:
        return student.sum().float() * 0.0
    # In float32, like detectron2's other losses, whatever precision autocast gave the features.
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=1)).mean()


def sample_mimic_boxes(instances: List[Instances], num_per_image: int) -> List[Instances]:
    """
    B_m: a random subset, up to ``num_per_image`` per image, of the T-head's sampled boxes that
    came from the refinement (``anchor_index >= 0``; appended GT boxes have no anchor location).
    """
    out = []
    for inst in instances:
        idx = nonzero_tuple(inst.anchor_index >= 0)[0]
        idx = idx[torch.randperm(len(idx), device=idx.device)[:num_per_image]]
        out.append(inst[idx])
    return out


def student_at_anchors(student: Tensor, boxes: List[Instances]) -> Tensor:
    """The S-head's side of the pairs: ``student`` ``(N, R, D)`` read at each box's original
    anchor location (``anchor_index``), image by image, ``(sum Mi, D)``."""
    return cat([s[b.anchor_index] for s, b in zip(student, boxes)])


def teacher_at_boxes(boxes: List[Instances], path: str) -> Tensor:
    """The T-head's side of the pairs on ``path`` (``"cls"`` or ``"reg"``): its class logits or
    regression features of every box, image by image, ``(sum Mi, D)``, in
    :func:`student_at_anchors`'s order."""
    return cat([b.get(_TEACHER_FIELDS[path]) for b in boxes])


def dual_path_mimic_losses(
    boxes: List[Instances],
    student_cls_logits: Tensor,
    student_reg_feats: Tensor,
    paths: Sequence[str] = ("cls", "reg"),
    detach_teacher: bool = True,
) -> Dict[str, Tensor]:
    """
    Mimic loss over B_m, with the S-head read at each box's original anchor location.

    Args:
        boxes: per image, B_m with ``anchor_index``, ``teacher_cls_logits`` ``(Mi, C + 1)``
            and ``teacher_reg_feats`` ``(Mi, D)``.
        student_cls_logits: ``(N, R, C + 1)`` the S-head's logits flattened over levels.
        student_reg_feats: ``(N, R, D)`` the S-head's regression features likewise.
        paths: which of ``"cls"`` (class logits) and ``"reg"`` (regression features) to mimic.
        detach_teacher: stop the mimic gradient at the T-head.

    Returns:
        ``loss_mimic_cls`` and / or ``loss_mimic_reg``.
    """
    assert set(paths) <= set(_TEACHER_FIELDS), f"unknown mimic paths {paths}"
    students = {"cls": student_cls_logits, "reg": student_reg_feats}
    losses = {}
    for path in paths:
        student = student_at_anchors(students[path], boxes)
        teacher = teacher_at_boxes(boxes, path)
        if detach_teacher:
            teacher = teacher.detach()
        losses[f"loss_mimic_{path}"] = cosine_mimic_loss(student, teacher)
    return losses


class DualPathMimicLoss(nn.Module):
    """
    :func:`dual_path_mimic_losses` as a submodule of the model (``MimicDet.mimic_loss``), so that
    a tool or a test reads each step's pairs and losses with a forward hook
    (``model.mimic_loss.register_forward_hook``) instead of patching the model's code. It holds
    no parameters or buffers: checkpoints are the same with it as without it.
    """

    def __init__(self, paths: Sequence[str] = ("cls", "reg"), detach_teacher: bool = True):
        """
        Args:
            paths, detach_teacher: see :func:`dual_path_mimic_losses`; ``paths`` not empty.
        """
        super().__init__()
        assert paths and set(paths) <= set(_TEACHER_FIELDS), f"mimic paths {paths}"
        self.paths = list(paths)
        self.detach_teacher = detach_teacher

    def forward(
        self, boxes: List[Instances], student_cls_logits: Tensor, student_reg_feats: Tensor
    ) -> Dict[str, Tensor]:
        """The arguments are :func:`dual_path_mimic_losses`'s first three, passed by position so
        that a forward hook receives all three."""
        return dual_path_mimic_losses(
            boxes, student_cls_logits, student_reg_feats, self.paths, self.detach_teacher
        )

    def extra_repr(self) -> str:
        return f"paths={self.paths}, detach_teacher={self.detach_teacher}"
