from .fcos import Float32BoxFCOS
from .level_assignment import LevelAssigner
from .meta_arch import MimicDet
from .mimic_loss import (
    DualPathMimicLoss,
    cosine_mimic_loss,
    dual_path_mimic_losses,
    sample_mimic_boxes,
)
from .refinement import RefinementModule
from .s_head import SHead
from .t_head import MimicTHead

__all__ = [
    "DualPathMimicLoss",
    "Float32BoxFCOS",
    "LevelAssigner",
    "MimicDet",
    "MimicTHead",
    "RefinementModule",
    "SHead",
    "cosine_mimic_loss",
    "dual_path_mimic_losses",
    "sample_mimic_boxes",
]
