"""
What Rank Mimicking and PFI read from a teacher: a class logit per student anchor, and an
assigner that picks each GT's candidate anchors. A dense detector (RetinaNet, FCOS) has both in
its head; a two-stage detector's dense stage is its RPN, whose objectness is the one class logit
of a single-class problem.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.meta_arch.rcnn import GeneralizedRCNN
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.structures import Boxes, Instances, pairwise_iou
from torch import Tensor, nn

__all__ = ["DenseView", "candidate_matches", "dense_view", "anchor_generator_of"]


@dataclass
class DenseView:
    """
    Attributes:
        in_features: the pyramid levels the predictions are made on, in the head's order.
        class_logits: FPN features (by name) -> per level ``(N, A*K, H, W)`` class logits.
        assigner: a module with FCOS's ``match_anchors`` or an IoU ``anchor_matcher``.
        anchor_generator: the anchors the logits belong to.
    """

    in_features: List[str]
    class_logits: Callable[[Dict[str, Tensor]], List[Tensor]]
    assigner: nn.Module
    anchor_generator: nn.Module


def dense_view(detector: nn.Module, num_classes: int) -> DenseView:
    """
    The dense predictions of ``detector`` for a student with ``num_classes`` classes:
    a ``DenseDetector``'s head, or a ``GeneralizedRCNN``'s RPN when ``num_classes`` is 1 (ours:
    the RPN's objectness stands for the one class; with more classes it has no per-class score).
    """
    if isinstance(detector, DenseDetector) and isinstance(detector.head, nn.Module):
        if detector.num_classes != num_classes:
            raise ValueError(
                f"Rank Mimicking and PFI compare class logits: the {type(detector).__name__} "
                f"teacher has {detector.num_classes} classes, the student {num_classes}"
            )
        head, assigner = detector.head, detector
    elif isinstance(detector, GeneralizedRCNN) and isinstance(detector.proposal_generator, RPN):
        if num_classes != 1:
            raise ValueError(
                "Rank Mimicking and PFI from a two-stage teacher read its RPN's class-agnostic "
                f"objectness, which stands for a class only when there is one; the student has "
                f"{num_classes} classes"
            )
        head, assigner = detector.proposal_generator.rpn_head, detector.proposal_generator
    else:
        raise ValueError(
            f"Rank Mimicking and PFI need a teacher with dense class predictions (a detectron2 "
            f"DenseDetector with one head, or a GeneralizedRCNN with an RPN), got "
            f"{type(detector).__name__} (MimicDet's S-head reads refined boxes, not fixed anchors)"
        )
    # the levels and anchors the logits belong to
    levels, anchor_generator = anchor_generator_of(detector)
    return DenseView(
        levels,
        lambda features: head([features[f] for f in levels])[0],
        assigner,
        anchor_generator,
    )


def anchor_generator_of(detector: nn.Module) -> Optional[Tuple[List[str], nn.Module]]:
    """
    The levels and anchor generator of a detector's anchors (what FGFI's mask and Rank
    Mimicking's candidates are read on for a student, what a teacher's logits belong to): a
    dense detector's own; a two-stage detector's RPN (FGFI's original setting); MimicDet's
    refinement (one anchor per location, ``REFINE.ANCHOR_SIZE_PER_STRIDE``). None
    for a detector without anchors.
    """
    if isinstance(detector, DenseDetector) and isinstance(detector.head, nn.Module):
        return list(detector.head_in_features), detector.anchor_generator
    if isinstance(detector, GeneralizedRCNN) and isinstance(detector.proposal_generator, RPN):
        rpn = detector.proposal_generator
        return list(rpn.in_features), rpn.anchor_generator
    refinement = getattr(detector, "refinement", None)
    if refinement is not None and hasattr(refinement, "anchor_generator"):
        return list(detector.head_in_features), refinement.anchor_generator
    return None


def same_anchors(a: nn.Module, b: nn.Module) -> bool:
    """Whether two anchor generators place the same anchors, in the same order."""
    cells_a, cells_b = list(a.cell_anchors), list(b.cell_anchors)
    return (
        list(a.strides) == list(b.strides)
        and a.offset == b.offset
        and len(cells_a) == len(cells_b)
        and all(x.shape == y.shape and torch.allclose(x, y) for x, y in zip(cells_a, cells_b))
    )


@torch.no_grad()
def candidate_matches(
    assigner: nn.Module, anchors: List[Boxes], gt_instances: List[Instances]
) -> List[Tensor]:
    """
    The one function through which Rank Mimicking asks an assigner for its positives: per
    image, ``(R,)`` the index of the GT each anchor (all levels concatenated) is a positive of,
    -1 for the others. FCOS: its own ``match_anchors``; RetinaNet and the RPN: their IoU
    ``anchor_matcher``, keeping the foreground label only (ignored anchors are not candidates).
    """
    if hasattr(assigner, "match_anchors"):
        return assigner.match_anchors(anchors, gt_instances)
    if not hasattr(assigner, "anchor_matcher"):
        raise ValueError(f"{type(assigner).__name__} has no anchor assigner to rank-mimic")
    all_anchors = Boxes.cat(anchors)
    matches = []
    for gt in gt_instances:
        if len(gt) == 0:
            matches.append(torch.full((len(all_anchors),), -1, device=all_anchors.device))
            continue
        matched, labels = assigner.anchor_matcher(pairwise_iou(gt.gt_boxes, all_anchors))
        matches.append(torch.where(labels == 1, matched, torch.full_like(matched, -1)))
    return matches
