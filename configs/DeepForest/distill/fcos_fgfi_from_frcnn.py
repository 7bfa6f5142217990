"""
FGFI (CVPR 2019) on the FCOS student, the paper code's weight. FCOS's anchors are its
stride-sized point boxes, whose IoU with a crown peaks on the level whose stride matches the
crown's size (P5 for a 50x60 px crown), a level FCOS does not train it on (P3 below 64 px).
With the default global threshold FGFI would mark 4 P5 cells and 1 P6 cell of such a crown and
none on P3; with the per-level threshold it marks 42 P3, 12 P4 and 4 P5..P7 cells (counted with
mimicdet.distill.fgfi_masks on FCOS's anchors of a 448 px image), so FCOS uses that reading.
"""

from .fcos_from_frcnn import dataloader, distiller, lr_multiplier, optimizer, train

model = distiller("FGFI.WEIGHT", 0.01, "FGFI.PER_LEVEL_THRESHOLD", True)
train.output_dir = "output/distill/fcos_fgfi_from_frcnn"

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
