"""MimicDet R-50-FPN as a LazyConfig; the same model (and values) as add_mimicdet_config builds."""

from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import BasicStem, ResNet
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.modeling.matcher import Matcher

from mimicdet.backbone import StaggeredFPN
from mimicdet.modeling import LevelAssigner, MimicDet, MimicTHead, RefinementModule, SHead

model = L(MimicDet)(
    backbone=L(StaggeredFPN)(
        bottom_up=L(ResNet)(
            stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
            stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=True, norm="FrozenBN"),
            out_features=["res2", "res3", "res4", "res5"],
            freeze_at=2,
        ),
        in_features="${.bottom_up.out_features}",
        out_channels=256,
        top_block=L(LastLevelP6P7)(in_channels=2048, out_channels="${..out_channels}"),
        # P2 in training feeds only the staggered T-head (False without it)
        finest_level_in_training=True,
    ),
    refinement=L(RefinementModule)(
        in_channels="${..backbone.out_channels}",
        conv_dim=256,
        num_convs=1,
        norm="",
        strides=[8, 16, 32, 64, 128],
        anchor_size_per_stride=4.0,
        anchor_offset=0.5,
        # each level's scale range centred on its anchor side (anchor_size_per_stride x stride)
        level_assigner=L(LevelAssigner)(
            levels=[3, 4, 5, 6, 7],
            rule="anchor_scale",
            anchor_sizes=[32.0, 64.0, 128.0, 256.0, 512.0],
            scale_range_half_width=0.5,
            canonical_box_size=224,
            canonical_level=4,
        ),
        center_sampling_ratio=0.3,
        min_center_radius=0.5,
        ignore_sampling_ratio=0.0,
        bbox_reg_weights=(1.0, 1.0, 1.0, 1.0),
        box_reg_loss_type="smooth_l1",
        prior_prob=0.01,
        focal_loss_alpha=-1.0,
        focal_loss_gamma=0.0,
        pre_nms_topk_train=2000,
        nms_thresh_train=0.8,
        post_nms_topk_train=2000,
        topk_test=1000,
    ),
    s_head=L(SHead)(
        in_channels="${..backbone.out_channels}",
        num_classes="${..num_classes}",
        conv_dim=256,
        kernel_sizes=[3, 5, 5, 5, 5],
        offset_dims=[64, 128],
        fc_dim=1024,
        detach_guidance=True,
        iou_threshold=0.6,
        batch_size_per_image=128,
        # paper: the 128 highest-loss boxes per image
        hard_mining="top_loss",
        neg_pos_ratio=3.0,
        bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
        box_reg_loss_type="smooth_l1",
        # paper: offsets from the micro-network alone (no box-aligned start)
        box_aligned_guidance=None,
    ),
    t_head=L(MimicTHead)(
        pool_levels=[2, 3, 4, 5, 6],
        staggered=True,
        level_assigner="${..refinement.level_assigner}",
        in_channels="${..backbone.out_channels}",
        pooler_resolution=7,
        pooler_type="ROIAlignV2",
        pooler_sampling_ratio=0,
        num_conv=4,
        conv_dim=256,
        num_fc=2,
        fc_dim=1024,
        bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
        smooth_l1_beta=0.0,
        box_reg_loss_type="smooth_l1",
        num_classes="${..num_classes}",
        proposal_append_gt=True,
        batch_size_per_image=128,
        positive_fraction=0.25,
        proposal_matcher=L(Matcher)(
            thresholds=[0.6], labels=[0, 1], allow_low_quality_matches=False
        ),
    ),
    head_in_features=["p3", "p4", "p5", "p6", "p7"],
    num_classes=80,
    mimic_paths=["cls", "reg"],
    mimic_per_image=64,
    detach_teacher=True,
    loss_weights={
        "loss_refine_cls": 1.0,
        "loss_refine_box": 1.0,
        "loss_s_cls": 1.0,
        "loss_s_box": 1.0,
        "loss_t_cls": 1.0,
        "loss_t_box": 1.0,
        "loss_mimic_cls": 1.0,
        "loss_mimic_reg": 1.0,
    },
    # paper: the S-head's class probability alone scores a detection
    score_with_objectness=False,
    test_score_thresh=0.005,
    test_nms_thresh=0.6,
    max_detections_per_image=100,
    pixel_mean=[103.530, 116.280, 123.675],
    pixel_std=[1.0, 1.0, 1.0],
)
