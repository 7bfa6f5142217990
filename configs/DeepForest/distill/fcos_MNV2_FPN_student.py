"""
The undistilled FCOS student: detectron2's FCOS on DeepForest (../fcos_MNV2_FPN.py) on the
distillation schedule of retinanet_MNV2_FPN_student.yaml (600 iterations, seed 1). Every FCOS
student in this folder reads this file.
"""

from ..fcos_MNV2_FPN import dataloader, lr_multiplier, model, optimizer, train

MAX_ITER = 600
train.max_iter = MAX_ITER
lr_multiplier.scheduler.milestones = [450, 555, MAX_ITER]
lr_multiplier.warmup_length = 50 / MAX_ITER
train.seed = 1
train.output_dir = "output/distill/fcos_student"

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
