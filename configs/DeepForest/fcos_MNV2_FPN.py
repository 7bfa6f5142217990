"""
detectron2's FCOS on DeepForest, as a LazyConfig. Backbone, input sizes, batch, schedule,
augmentation and evaluation are read from ``Base-DeepForest-MNV2.yaml`` (shared with MimicDet
and RetinaNet), so only the detector differs. Three departures from detectron2's FCOS config, all
to keep the comparison fair: P6/P7 come from res5 (as RetinaNet's and MimicDet's), not from P5,
so all backbones are the same modules; the test score threshold is RetinaNet's 0.05 rather
than FCOS's 0.2, which at this short schedule would drop most detections; the test NMS IoU is
RetinaNet's 0.5 (as MimicDet's here) rather than FCOS's 0.6. And FCOS skips the 3 tree-less
train tiles, which detectron2 v0.6's FCOS cannot label.
"""

import os

import detectron2.data.transforms as T
import torch
from torch import nn
from detectron2.config import LazyCall as L
from detectron2.config import get_cfg
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.evaluation import COCOEvaluator
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.modeling.meta_arch.fcos import FCOSHead
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from fvcore.common.param_scheduler import MultiStepParamScheduler
from omegaconf import OmegaConf

from mimicdet import add_mimicdet_config
from mimicdet.backbone import mobilenet_v2_bottom_up
from mimicdet.modeling import Float32BoxFCOS

BASE_YAML = os.path.join(os.path.dirname(__file__), "Base-DeepForest-MNV2.yaml")
base = get_cfg()
add_mimicdet_config(base)
base.merge_from_file(BASE_YAML)

FPN_IN_FEATURES = ["res3", "res4", "res5"]


def group_norm(channels):
    """detectron2's "GN" (32 groups); v0.6's RetinaNetHead probes get_norm(norm, 1), which
    current torch refuses for GroupNorm(32, 1), so the probe gets one group."""
    return nn.GroupNorm(min(32, channels), channels)


# detectron2's FCOS, its boxes decoded in float32 so that it also trains with AMP
model = L(Float32BoxFCOS)(
    backbone=L(FPN)(
        bottom_up=L(mobilenet_v2_bottom_up)(
            norm=base.MODEL.MOBILENET.NORM,
            width_mult=base.MODEL.MOBILENET.WIDTH_MULT,
            out_features=list(base.MODEL.MOBILENET.OUT_FEATURES),
            freeze_at=base.MODEL.BACKBONE.FREEZE_AT,
            imagenet_weights=base.MODEL.MOBILENET.IMAGENET_WEIGHTS,
        ),
        in_features=FPN_IN_FEATURES,
        out_channels=base.MODEL.FPN.OUT_CHANNELS,
        norm=base.MODEL.FPN.NORM,
        top_block=L(LastLevelP6P7)(
            in_channels=1280, out_channels="${..out_channels}", in_feature="res5"
        ),
        fuse_type=base.MODEL.FPN.FUSE_TYPE,
    ),
    head=L(FCOSHead)(
        input_shape=[ShapeSpec(channels=base.MODEL.FPN.OUT_CHANNELS)] * 5,
        num_classes="${..num_classes}",
        conv_dims=[base.MODEL.FPN.OUT_CHANNELS] * 4,
        prior_prob=0.01,
        norm=group_norm,
    ),
    num_classes=base.MODEL.RETINANET.NUM_CLASSES,
    head_in_features=["p3", "p4", "p5", "p6", "p7"],
    # detectron2's default, written out: tools/benchmark.py sweeps it as FCOS's own key
    center_sampling_radius=1.5,
    focal_loss_alpha=0.25,
    focal_loss_gamma=2.0,
    test_score_thresh=base.MODEL.RETINANET.SCORE_THRESH_TEST,
    test_topk_candidates=base.MODEL.RETINANET.TOPK_CANDIDATES_TEST,
    test_nms_thresh=base.MODEL.RETINANET.NMS_THRESH_TEST,
    max_detections_per_image=base.TEST.DETECTIONS_PER_IMAGE,
    pixel_mean=list(base.MODEL.PIXEL_MEAN),
    pixel_std=list(base.MODEL.PIXEL_STD),
)

dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(
        names=list(base.DATASETS.TRAIN),
        # detectron2 v0.6's FCOS.match_anchors fails on an image without boxes (max over an
        # empty dim), so FCOS alone skips the 3 tree-less train tiles of 72
        filter_empty=True,
    ),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(
                short_edge_length=tuple(base.INPUT.MIN_SIZE_TRAIN),
                max_size=base.INPUT.MAX_SIZE_TRAIN,
                sample_style=base.INPUT.MIN_SIZE_TRAIN_SAMPLING,
            ),
            L(T.RandomFlip)(horizontal=base.INPUT.RANDOM_FLIP == "horizontal"),
        ],
        image_format=base.INPUT.FORMAT,
    ),
    total_batch_size=base.SOLVER.IMS_PER_BATCH,
    num_workers=base.DATALOADER.NUM_WORKERS,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names=base.DATASETS.TEST[0], filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[
            L(T.ResizeShortestEdge)(
                short_edge_length=base.INPUT.MIN_SIZE_TEST, max_size=base.INPUT.MAX_SIZE_TEST
            ),
        ],
        image_format=base.INPUT.FORMAT,
    ),
    num_workers=base.DATALOADER.NUM_WORKERS,
)
# detectron2 built without its C++ ops has no fast COCOeval; pycocotools' own always works
dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}", use_fast_impl=False, output_dir=None
)

# yacs SOLVER.* -> detectron2's DefaultTrainer optimizer (SGD, no weight decay on norms,
# the same gradient clipping) and WarmupMultiStepLR, spelled as LazyConfig objects
optimizer = L(maybe_add_gradient_clipping(base, torch.optim.SGD))(
    params=L(get_default_optimizer_params)(
        base_lr=base.SOLVER.BASE_LR,
        weight_decay_norm=base.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=base.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=base.SOLVER.WEIGHT_DECAY_BIAS,
    ),
    lr=base.SOLVER.BASE_LR,
    momentum=base.SOLVER.MOMENTUM,
    nesterov=base.SOLVER.NESTEROV,
    weight_decay=base.SOLVER.WEIGHT_DECAY,
)
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[base.SOLVER.GAMMA**k for k in range(len(base.SOLVER.STEPS) + 1)],
        milestones=list(base.SOLVER.STEPS) + [base.SOLVER.MAX_ITER],
    ),
    warmup_length=base.SOLVER.WARMUP_ITERS / base.SOLVER.MAX_ITER,
    warmup_method=base.SOLVER.WARMUP_METHOD,
    warmup_factor=base.SOLVER.WARMUP_FACTOR,
)

train = dict(
    output_dir="./output/fcos_MNV2_FPN",
    init_checkpoint="",
    max_iter=base.SOLVER.MAX_ITER,
    amp=dict(enabled=False),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=base.SOLVER.CHECKPOINT_PERIOD, max_to_keep=100),
    eval_period=base.TEST.EVAL_PERIOD,
    log_period=20,
    device=base.MODEL.DEVICE,
    # detectron2's default_setup reads it: negative draws a seed per run, as the yaml SEED -1
    seed=base.SEED,
)
