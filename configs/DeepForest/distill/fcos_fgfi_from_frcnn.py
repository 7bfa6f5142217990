"""
FGFI (CVPR 2019) on the FCOS student, the paper code's weight. FCOS's anchors are its
stride-sized point boxes; a crown marks cells on its own level only (the DeFeat repository's
FGFI port, MODEL.DISTILL.GT_LEVEL_SCALE), which for crowns under 112 px is P3, where FCOS learns
them below 64 px: a 50x60 px crown on a 448 px image marks 42 P3 cells (counted with
mimicdet.distill.fgfi_masks on FCOS's anchors).
"""

from .fcos_from_frcnn import dataloader, distiller, lr_multiplier, optimizer, train

model = distiller("FGFI.WEIGHT", 0.01)
train.output_dir = "output/distill/fcos_fgfi_from_frcnn"

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
