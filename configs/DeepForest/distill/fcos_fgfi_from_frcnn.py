"""FGFI (CVPR 2019) on the FCOS student, the paper code's weight. FCOS's anchors are its
stride-sized point boxes, so the IoU rule marks the cells whose stride box fits a crown best."""

from .fcos_from_frcnn import dataloader, distiller, kd, lr_multiplier, optimizer, train

kd.FGFI.WEIGHT = 0.01
model = distiller(kd)
train.output_dir = "output/distill/fcos_fgfi_from_frcnn"

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
