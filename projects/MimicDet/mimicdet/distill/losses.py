"""The distillation losses. Features are per FPN level ``(N, C, H, W)``, student ones already
through their adaptation layer; masks per level ``(N, H, W)``. The teacher's tensors carry no
gradient (computed under ``no_grad``)."""

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "fgfi_loss",
    "defeat_losses",
    "RANK_SCORES",
    "check_rank_score",
    "rank_mimic_loss",
    "pfi_loss",
    "pfi_weight",
    "PFI_PREDICTION_GAPS",
    "check_pfi_prediction_gap",
]


def _zero(tensors: Sequence[Tensor]) -> Tensor:
    """A zero that stays connected to the student's graph (DDP needs every parameter used)."""
    return sum(t.sum() for t in tensors) * 0.0


def fgfi_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], masks: Sequence[Tensor]):
    """
    FGFI's imitation loss: the squared difference summed over masked locations and channels of
    every level, divided by ``2 * N_p`` with ``N_p`` the masked locations of all levels and images
    (the authors' normaliser for one map, extended to an FPN by counting all of them).
    """
    num_masked = sum(m.sum() for m in masks)
    if num_masked == 0:
        return _zero(student)
    total = sum(
        ((s - t).pow(2) * m[:, None].to(s.dtype)).sum() for s, t, m in zip(student, teacher, masks)
    )
    return total / (2 * num_masked)


def defeat_losses(
    student: Sequence[Tensor], teacher: Sequence[Tensor], fg_masks: Sequence[Tensor]
) -> Tuple[Tensor, Tensor]:
    """
    DeFeat's decoupled feature losses, normalised as the authors' code does: per level, the
    squared difference summed over the foreground (background) cells and channels, divided by
    twice the number of such elements, channels included (at least 1: a level without such
    cells adds 0); then averaged over all the levels. The papers' weights (4 and 16 on COCO)
    were tuned on this normaliser.

    Returns:
        (foreground loss, background loss), to be weighted separately.
    """
    fg_terms, bg_terms = [], []
    for s, t, fg in zip(student, teacher, fg_masks):
        squares = (s - t).pow(2).sum(dim=1)  # (N, H, W), summed over channels
        fg = fg.to(squares.dtype)
        channels = s.shape[1]
        for mask, terms in ((fg, fg_terms), (1 - fg, bg_terms)):
            elements = 2 * channels * mask.sum()
            terms.append((squares * mask).sum() / elements.clamp(min=1.0))
    return torch.stack(fg_terms).mean(), torch.stack(bg_terms).mean()


# what Rank Mimicking's softmax ranks the candidates by (MODEL.DISTILL.RANK.SCORE)
RANK_SCORES = ("probability", "logit")


def check_rank_score(score: str) -> None:
    """Refuses a ``MODEL.DISTILL.RANK.SCORE`` not in :data:`RANK_SCORES`."""
    if score not in RANK_SCORES:
        raise ValueError(f"MODEL.DISTILL.RANK.SCORE must be one of {RANK_SCORES}, got {score!r}")


def rank_mimic_loss(
    teacher_scores: List[Tensor], student_scores: List[Tensor], score: str = "probability"
) -> Tensor:
    """
    Rank Mimicking (Li et al., AAAI 2022): per GT, the scores of its candidate anchors at the
    GT's class, teacher and student in the same anchor order, each turned into a distribution by
    a softmax; ``KL(teacher || student)``, averaged over the GTs. Sorting either side on its own
    would lose the anchor correspondence that the loss is about.

    Args:
        teacher_scores, student_scores: per GT, ``(K_g,)`` logits (log-odds) of the same K_g
            anchors.
        score: what the softmax reads: ``"probability"``, the sigmoid of each logit (the public
            port's: a soft ranking, at most e times more mass on one candidate than on another,
            whose gradient the sigmoid's slope p(1 - p) damps wherever the student is sure), or
            ``"logit"`` itself (ours until 2026-12-07: undamped, it can pull the student's
            classifier as hard as the student's own classification loss; docs/distillation.md).
    """
    check_rank_score(score)
    if not student_scores:
        raise ValueError("rank_mimic_loss needs at least one GT (use a zero loss without GTs)")
    terms = []
    for t, s in zip(teacher_scores, student_scores):
        if t.shape != s.shape:
            raise ValueError(
                f"rank_mimic_loss: teacher {tuple(t.shape)} vs student {tuple(s.shape)}"
            )
        t, s = t.float(), s.float()
        if score == "probability":
            t, s = t.sigmoid(), s.sigmoid()
        log_p_t, log_p_s = F.log_softmax(t, dim=0), F.log_softmax(s, dim=0)
        terms.append((log_p_t.exp() * (log_p_t - log_p_s)).sum())
    return torch.stack(terms).mean()


# what PFI's weight compares (MODEL.DISTILL.PFI.PREDICTION_GAP)
PFI_PREDICTION_GAPS = ("logit", "probability")


def check_pfi_prediction_gap(prediction_gap: str) -> None:
    """Refuses a ``MODEL.DISTILL.PFI.PREDICTION_GAP`` not in :data:`PFI_PREDICTION_GAPS`."""
    if prediction_gap not in PFI_PREDICTION_GAPS:
        raise ValueError(
            f"MODEL.DISTILL.PFI.PREDICTION_GAP must be one of {PFI_PREDICTION_GAPS}, "
            f"got {prediction_gap!r}"
        )


def pfi_loss(
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    student_logits: Sequence[Tensor],
    teacher_logits: Sequence[Tensor],
    prediction_gap: str = "logit",
) -> Tensor:
    """
    Prediction-guided Feature Imitation (Li et al., AAAI 2022): per location, the mean over
    channels of the squared teacher-student prediction difference weights the squared feature
    difference (mean over channels, default: ours, the paper leaves the reduction open); the
    weighted differences are averaged over locations, then over levels. The weight is a guide
    and gets no gradient (default, ours), so the student cannot lower the loss by matching
    predictions instead of features.

    Args:
        student, teacher: per level ``(N, C, H, W)`` features.
        student_logits, teacher_logits: per level ``(N, K, H, W)`` classification logits.
        prediction_gap: ``"logit"`` compares the logits (the paper's as our notes read it),
            ``"probability"`` their sigmoids (ours, for logits calibrated apart, as an RPN's
            objectness and a focal-loss student's are).
    """
    check_pfi_prediction_gap(prediction_gap)
    terms = []
    for s, t, s_logit, t_logit in zip(student, teacher, student_logits, teacher_logits):
        weight = pfi_weight(s_logit, t_logit, prediction_gap)
        terms.append((weight * (s - t).pow(2).mean(dim=1)).mean())
    return torch.stack(terms).mean()


def pfi_weight(student_logits: Tensor, teacher_logits: Tensor, prediction_gap: str) -> Tensor:
    """PFI's ``(N, H, W)`` weight on one level (:func:`pfi_loss`): the mean over channels of the
    squared teacher-student gap of the logits or of their sigmoids, without gradient."""
    t, s = teacher_logits.detach(), student_logits.detach()
    if prediction_gap == "probability":
        t, s = t.sigmoid(), s.sigmoid()
    return (t - s).pow(2).mean(dim=1)
