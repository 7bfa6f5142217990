"""DeFeat (CVPR 2021) on the FCOS student: decoupled foreground / background imitation, COCO
weights."""

from .fcos_from_frcnn import dataloader, distiller, lr_multiplier, optimizer, train

model = distiller("DEFEAT.FG_WEIGHT", 4.0, "DEFEAT.BG_WEIGHT", 16.0)
train.output_dir = "output/distill/fcos_defeat_from_frcnn"

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
