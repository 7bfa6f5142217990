"""
detectron2's FCOS on Fashion scenes: configs/DeepForest/fcos_MNV2_FPN.py (the same backbone, FPN,
head, schedule and solver) on the 10-class scenes of tools/prepare_fashion_scenes.py, with the
dataset keys of retinanet_MNV2_FPN.yaml in this folder.
"""

from ..DeepForest.fcos_MNV2_FPN import dataloader, lr_multiplier, model, optimizer, train

model.num_classes = 10
dataloader.train.dataset.names = ["fashion_scenes_train"]
dataloader.test.dataset.names = "fashion_scenes_val"
# 512 px scenes, objects 8..400 px (COCO's size mix), kept at their size with mild jitter
dataloader.train.mapper.augmentations[0].short_edge_length = (480, 512, 544)
dataloader.test.mapper.augmentations[0].short_edge_length = 512
train.output_dir = "./output/fashion_scenes/fcos_MNV2_FPN"

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
