"""
Knowledge distillation from a separate, frozen teacher detector (the methods MimicDet is compared
against): FGFI, DeFeat, Rank Mimicking and Prediction-guided Feature Imitation. Each method is a
mask builder (which locations) and a loss (how they are compared); :mod:`.teacher` loads and
freezes the teacher so that it cannot be silently wrong; :class:`Distiller` (the
``MODEL.META_ARCHITECTURE "Distiller"``, keys in :func:`add_distill_config`) trains a detectron2
detector with them.

Depends on detectron2 and :mod:`mimicdet.modeling`; nothing in :mod:`mimicdet.modeling` imports
this package.
"""

from .config import add_distill_config
from .dense_view import DenseView, candidate_matches, dense_view, rank_targets
from .losses import (
    PFI_PREDICTION_GAPS,
    RANK_SCORES,
    defeat_losses,
    fgfi_loss,
    pfi_loss,
    pfi_weight,
    rank_mimic_loss,
)
from .masks import defeat_foreground_masks, fgfi_masks, gt_levels
from .meta_arch import Distiller, build_teacher, distiller_arguments
from .teacher import FrozenTeacher, load_teacher_weights

__all__ = [
    "PFI_PREDICTION_GAPS",
    "RANK_SCORES",
    "DenseView",
    "Distiller",
    "FrozenTeacher",
    "add_distill_config",
    "build_teacher",
    "candidate_matches",
    "defeat_foreground_masks",
    "dense_view",
    "distiller_arguments",
    "defeat_losses",
    "fgfi_loss",
    "fgfi_masks",
    "gt_levels",
    "load_teacher_weights",
    "pfi_loss",
    "pfi_weight",
    "rank_mimic_loss",
    "rank_targets",
]
