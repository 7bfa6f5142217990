"""MimicDet R-50-FPN 1x as a LazyConfig: the twin of mimicdet_R_50_FPN_1x.yaml."""

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from mimicdet.evaluation import HAS_DETECTRON2_OPS

from ..common.models.mimicdet import model  # noqa: F401 (the config exports it)

dataloader = get_config("common/data/coco.py").dataloader
optimizer = get_config("common/optim.py").SGD
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_1x
train = get_config("common/train.py").train

# 1x: single scale, shorter side 800, as the yaml twin
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(800,), max_size=1333, sample_style="choice"),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.mapper.use_instance_mask = False
optimizer.lr = 0.01
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
# default (detectron2's): float32; True: float16 autocast, as SOLVER.AMP.ENABLED in the yaml twin
train.amp.enabled = False
# detectron2 built without its C++ ops has no fast COCOeval; use pycocotools' own
dataloader.evaluator.use_fast_impl = HAS_DETECTRON2_OPS
