"""
What Rank Mimicking and PFI read from a teacher, per student anchor:
- PFI: a dense logit map to weigh the feature difference by;
- Rank Mimicking: an assigner that picks each GT's candidate anchors, and the teacher's score of
  each candidate at the GT's class.
A dense detector (RetinaNet, FCOS) has all of it in its head. A two-stage detector's dense stage
is its RPN (assigner, class-agnostic objectness for PFI); its class scores come from its second
stage, which classifies the candidate anchors as if they were proposals (``RANK.TWO_STAGE_SCORES
"roi_head"``), or, for one class only, from the RPN's objectness (``"rpn"``).
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import cat
from detectron2.modeling.meta_arch.dense_detector import DenseDetector, permute_to_N_HWA_K
from detectron2.modeling.meta_arch.rcnn import GeneralizedRCNN
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.structures import Boxes, Instances, pairwise_iou
from torch import Tensor, nn

__all__ = [
    "DenseView",
    "TWO_STAGE_SCORES",
    "candidate_matches",
    "dense_view",
    "rank_targets",
    "anchor_generator_of",
    "per_anchor_logits",
]

# where a two-stage teacher's class scores for Rank Mimicking come from (RANK.TWO_STAGE_SCORES)
TWO_STAGE_SCORES = ("roi_head", "rpn")


@dataclass
class DenseView:
    """
    Attributes:
        in_features: the pyramid levels the predictions are made on, in the head's order.
        class_logits: FPN features (by name) -> per level ``(N, A*C, H, W)`` logits, C the
            student's classes for a dense teacher, 1 (objectness) for an RPN.
        comparable_student_logits: a student's per level ``(N, A*K, H, W)`` class logits ->
            what ``class_logits`` compares with, for PFI: the logits themselves, or for an RPN
            teacher each anchor's largest class logit (``(N, A, H, W)``; ours: the student's
            "some object here" next to the RPN's, the same for one class).
        candidate_scores: (teacher features, ``class_logits``' output, the student's anchors of
            all levels as one ``Boxes``, per image the indices of the candidate anchors, the
            images' sizes) -> per image ``(R_i, K)`` the teacher's class logits of those anchors,
            on the student's scale (per-class sigmoid logits, log-odds), for Rank Mimicking.
            None when Rank Mimicking is off.
        assigner: a module with FCOS's ``match_anchors`` or an IoU ``anchor_matcher``.
        anchor_generator: the anchors the logits belong to.
    """

    in_features: List[str]
    class_logits: Callable[[Dict[str, Tensor]], List[Tensor]]
    comparable_student_logits: Callable[[Tensor], Tensor]
    candidate_scores: Optional[Callable[..., List[Tensor]]]
    assigner: nn.Module
    anchor_generator: nn.Module


def dense_view(
    detector: nn.Module, num_classes: int, two_stage_scores: Optional[str] = "roi_head"
) -> DenseView:
    """
    The dense predictions of ``detector`` for a student with ``num_classes`` classes: a
    ``DenseDetector``'s head, or a ``GeneralizedRCNN``'s RPN with, for Rank Mimicking, the class
    scores of ``two_stage_scores`` (:data:`TWO_STAGE_SCORES`; "rpn" only when ``num_classes`` is
    1, where the objectness stands for the one class; None: no Rank Mimicking, PFI only).
    """
    levels, anchor_generator = anchor_generator_of(detector) or (None, None)
    if isinstance(detector, DenseDetector) and isinstance(detector.head, nn.Module):
        if detector.num_classes != num_classes:
            raise ValueError(
                f"Rank Mimicking and PFI compare class logits: the {type(detector).__name__} "
                f"teacher has {detector.num_classes} classes, the student {num_classes}"
            )
        head = detector.head
        return DenseView(
            levels,
            lambda features: head([features[f] for f in levels])[0],
            lambda student_logits: student_logits,
            _dense_candidate_scores(num_classes),
            detector,
            anchor_generator,
        )
    if isinstance(detector, GeneralizedRCNN) and isinstance(detector.proposal_generator, RPN):
        rpn = detector.proposal_generator
        if two_stage_scores is None:
            candidate_scores = None
        elif two_stage_scores == "roi_head":
            candidate_scores = _roi_head_candidate_scores(detector.roi_heads, num_classes)
        elif two_stage_scores == "rpn":
            if num_classes != 1:
                raise ValueError(
                    'MODEL.DISTILL.RANK.TWO_STAGE_SCORES "rpn" reads the RPN\'s class-agnostic '
                    "objectness, which stands for a class only when there is one; the student "
                    f'has {num_classes} classes (use "roi_head")'
                )
            candidate_scores = _dense_candidate_scores(1)
        else:
            raise ValueError(
                f"MODEL.DISTILL.RANK.TWO_STAGE_SCORES {two_stage_scores!r}: one of "
                f"{TWO_STAGE_SCORES}"
            )
        return DenseView(
            levels,
            lambda features: rpn.rpn_head([features[f] for f in levels])[0],
            lambda student_logits: _best_class_per_anchor(student_logits, num_classes),
            candidate_scores,
            rpn,
            anchor_generator,
        )
    raise ValueError(
        f"Rank Mimicking and PFI need a teacher with dense class predictions (a detectron2 "
        f"DenseDetector with one head, or a GeneralizedRCNN with an RPN), got "
        f"{type(detector).__name__} (MimicDet's S-head reads refined boxes, not fixed anchors)"
    )


def _best_class_per_anchor(logits: Tensor, num_classes: int) -> Tensor:
    """``(N, A*K, H, W)`` -> ``(N, A, H, W)``: each anchor's largest class logit."""
    n, _, h, w = logits.shape
    return logits.view(n, -1, num_classes, h, w).amax(dim=2)


def per_anchor_logits(logits: List[Tensor], num_classes: int) -> Tensor:
    """Per level ``(N, A*K, H, W)`` dense logits -> ``(N, R, K)``, one row per anchor in the
    order of the anchor generator's ``Boxes.cat`` (levels, then H, W, A): detectron2's own
    flattening."""
    return cat([permute_to_N_HWA_K(x, num_classes) for x in logits], dim=1)


def _dense_candidate_scores(num_classes: int):
    """A dense teacher's own logits at the candidate anchors."""

    def scores(features, class_logits, anchors, candidates, image_sizes):
        flat = per_anchor_logits(class_logits, num_classes)
        return [flat[i, idx] for i, idx in enumerate(candidates)]

    return scores


def _roi_head_candidate_scores(roi_heads: nn.Module, num_classes: int):
    """
    A two-stage teacher's second stage on the candidate anchors, taken as proposals as detectron2
    would take them (clipped to the image): pooled from its own levels, through its box head and
    classifier. Its class probabilities (a softmax over K + 1) become log-odds, the scale of a
    dense student's per-class sigmoid logits (ours), so that a softmax over the candidates ranks
    both sides by odds; a sigmoid classifier's logits are log-odds already.
    """
    predictor = getattr(roi_heads, "box_predictor", None)
    if not isinstance(roi_heads, StandardROIHeads) or isinstance(predictor, nn.ModuleList):
        raise ValueError(
            'MODEL.DISTILL.RANK.TWO_STAGE_SCORES "roi_head" runs the box head of the teacher\'s '
            f"StandardROIHeads (one stage of boxes) on the candidate anchors; the teacher has "
            f'{type(roi_heads).__name__} (a single-class dataset may use "rpn")'
        )
    sigmoid = getattr(predictor, "use_sigmoid_ce", False)  # detectron2 after v0.6
    if roi_heads.num_classes != num_classes:
        raise ValueError(
            f"Rank Mimicking compares class scores: the teacher's ROI heads have "
            f"{roi_heads.num_classes} classes, the student {num_classes}"
        )

    def scores(features, class_logits, anchors, candidates, image_sizes):
        boxes = []
        for idx, size in zip(candidates, image_sizes):
            image_boxes = anchors[idx].clone()
            image_boxes.clip(size)  # as the RPN clips its proposals
            boxes.append(image_boxes)
        counts = [len(b) for b in boxes]
        if sum(counts) == 0:
            empty = anchors.tensor.new_zeros((0, num_classes))
            return [empty for _ in candidates]
        pooled = roi_heads.box_pooler([features[f] for f in roi_heads.box_in_features], boxes)
        logits, _ = predictor(roi_heads.box_head(pooled))
        logits = logits.float()  # K classes, then the background (column K)
        if sigmoid:
            log_odds = logits[:, :num_classes]
        else:
            log_odds = torch.logit(F.softmax(logits, dim=1)[:, :num_classes], eps=1e-6)
        return list(log_odds.split(counts))

    return scores


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


@torch.no_grad()
def rank_targets(
    view: DenseView,
    t_features: Dict[str, Tensor],
    t_logits: Optional[List[Tensor]],
    anchors: List[Boxes],
    gt_instances: List[Instances],
    image_sizes: List[Tuple[int, int]],
) -> List[Tuple[int, Tensor, int, Tensor]]:
    """
    What Rank Mimicking compares, per GT with at least one candidate: ``(image index, its
    candidate anchors' indices (K_g,) into all levels concatenated, its class, the teacher's
    scores of those anchors at that class (K_g,))``, GTs in image order. The one place that
    groups the teacher's candidates by GT, for the loss and for the tools that measure it.

    Args:
        view: the teacher's :class:`DenseView` (its assigner and candidate scores).
        t_features, t_logits: the teacher's pyramid and ``view.class_logits`` of it (None for a
            two-stage teacher, whose second stage scores the candidates from its features).
        anchors: the student's anchors per level; gt_instances, image_sizes: per image.
    """
    matches = candidate_matches(view.assigner, anchors, gt_instances)
    candidates = [(matched >= 0).nonzero().squeeze(1) for matched in matches]
    scores = view.candidate_scores(
        t_features, t_logits, Boxes.cat(anchors), candidates, image_sizes
    )
    targets = []
    for i, (matched, idx, gt) in enumerate(zip(matches, candidates, gt_instances)):
        owner = matched[idx]  # the GT each candidate belongs to
        for g, cls in enumerate(gt.gt_classes.tolist()):
            mine = owner == g
            if mine.any():
                targets.append((i, idx[mine], cls, scores[i][mine, cls]))
    return targets
