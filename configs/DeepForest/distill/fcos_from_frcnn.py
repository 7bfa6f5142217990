"""
The FCOS student (fcos_MNV2_FPN_student.py: same data, schedule and seed as the undistilled
baseline) distilled from the Faster R-CNN teacher (faster_rcnn_MNV2_FPN_teacher.yaml, trained
first), as a LazyConfig; the method files beside this one call ``distiller`` with their terms.
Rank Mimicking and PFI do not apply here: FCOS predicts once per location, the teacher's RPN
nine times.
"""

from detectron2.config import LazyCall as L
from detectron2.config import get_cfg

from mimicdet.distill import Distiller, add_distill_config, build_teacher, distiller_arguments

from .fcos_MNV2_FPN_student import dataloader, lr_multiplier
from .fcos_MNV2_FPN_student import model as student
from .fcos_MNV2_FPN_student import optimizer, train


def distiller(*overrides):
    """
    The distiller of ``student`` with MODEL.DISTILL's defaults (mimicdet/distill/config.py)
    changed by ``overrides``, a yacs merge list without the prefix, e.g. ``"FGFI.WEIGHT", 0.01``.
    Its values end up in the model node (``model.weights.fgfi=...`` overrides them).
    """
    defaults = get_cfg()
    add_distill_config(defaults)
    kd = defaults.MODEL.DISTILL
    kd.merge_from_list(list(overrides))
    return L(Distiller)(
        student=student,
        # built on the CPU; train_net moves the whole distiller, teacher included, to train.device
        teacher=L(build_teacher)(
            config_file="configs/DeepForest/distill/faster_rcnn_MNV2_FPN_teacher.yaml",
            weights="output/distill/faster_rcnn_teacher/model_final.pth",
            device="cpu",
        ),
        **distiller_arguments(kd),
    )


__all__ = ["dataloader", "distiller", "lr_multiplier", "optimizer", "train"]
