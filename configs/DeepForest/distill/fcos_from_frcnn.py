"""
The FCOS student (fcos_MNV2_FPN_student.py: same data, schedule and seed as the undistilled
baseline) distilled from the Faster R-CNN teacher (faster_rcnn_MNV2_FPN_teacher.yaml, trained
first), as a LazyConfig. ``kd`` holds MODEL.DISTILL's keys with their defaults (commented in
mimicdet/distill/config.py); the method files beside this one set its terms. Rank Mimicking and
PFI do not apply here: FCOS predicts once per location, the teacher's RPN nine times.
"""

from detectron2.config import LazyCall as L
from detectron2.config import get_cfg

from mimicdet.distill import Distiller, add_distill_config, build_teacher, distiller_arguments

from .fcos_MNV2_FPN_student import dataloader, lr_multiplier
from .fcos_MNV2_FPN_student import model as student
from .fcos_MNV2_FPN_student import optimizer, train

_defaults = get_cfg()
add_distill_config(_defaults)
kd = _defaults.MODEL.DISTILL
kd.FEATURES = ["p3", "p4", "p5", "p6", "p7"]


def distiller(kd):
    """The distiller of ``student`` with the terms ``kd`` switches on."""
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


__all__ = ["dataloader", "distiller", "kd", "lr_multiplier", "optimizer", "train"]
