"""DeFeat (CVPR 2021) on the FCOS student: decoupled foreground / background imitation, COCO
weights."""

from .fcos_from_frcnn import dataloader, distiller, kd, lr_multiplier, optimizer, train

kd.DEFEAT.FG_WEIGHT = 4.0
kd.DEFEAT.BG_WEIGHT = 16.0
model = distiller(kd)
train.output_dir = "output/distill/fcos_defeat_from_frcnn"

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
