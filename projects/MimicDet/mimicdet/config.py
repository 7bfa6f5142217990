"""Default config keys of MimicDet; every key says whether the paper fixes it or we chose it."""

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .backbone.mobilenet_v2 import add_mobilenet_config


def get_mimicdet_cfg(config_file=None, opts=()):
    """
    The yacs config that every entry point of this project reads (train_net.py, the tools, a
    distiller's teacher): detectron2's defaults plus MimicDet's keys and the distillers'
    (``MODEL.DISTILL``), then ``config_file`` and ``opts`` merged in that order; not frozen.
    One reader, so that no tool refuses a config that train_net.py accepts.
    """
    # imported here, not above: mimicdet.distill imports this module
    from .distill.config import add_distill_config

    cfg = get_cfg()
    add_mimicdet_config(cfg)
    add_distill_config(cfg)
    if config_file is not None:
        cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(opts))
    return cfg


def add_mimicdet_config(cfg):
    """
    Add MimicDet's keys (``MODEL.MIMICDET``, ``MODEL.MOBILENET``, ``INPUT.RANDOM_FLIP_VERTICAL``)
    and nothing else: every key detectron2 already has keeps its value, as in detectron2's own
    projects. The values MimicDet needs for detectron2's keys (the meta-architecture, the
    backbone, and the ``MODEL.ROI_HEADS.*`` / ``MODEL.ROI_BOX_HEAD.*`` keys that configure the
    T-head, detectron2's ``ROIHeads.from_config`` reading them) are in
    ``configs/Base-MimicDet.yaml``; ``MODEL.ROI_HEADS.NUM_CLASSES`` is the one number of classes
    for every head.
    """
    _C = cfg
    # MODEL.MOBILENET: the MobileNetV2 bottom-up of the DeepForest configs (keys commented there)
    add_mobilenet_config(_C)

    _C.MODEL.MIMICDET = CN()
    # paper: the T-head pools a box from one level finer than the S-head handles it on
    _C.MODEL.MIMICDET.STAGGERED = True
    # multipliers of the loss terms; the paper sums them unweighted
    _C.MODEL.MIMICDET.LOSS_WEIGHTS = CN()
    # paper: 1 (refinement objectness BCE)
    _C.MODEL.MIMICDET.LOSS_WEIGHTS.REFINE_CLS = 1.0
    # paper: 1 (refinement box L1)
    _C.MODEL.MIMICDET.LOSS_WEIGHTS.REFINE_BOX = 1.0
    # paper: 1 (S-head cross-entropy)
    _C.MODEL.MIMICDET.LOSS_WEIGHTS.S_CLS = 1.0
    # paper: 1 (S-head box L1)
    _C.MODEL.MIMICDET.LOSS_WEIGHTS.S_BOX = 1.0
    # paper: 1 (T-head cross-entropy)
    _C.MODEL.MIMICDET.LOSS_WEIGHTS.T_CLS = 1.0
    # paper: 1 (T-head box L1)
    _C.MODEL.MIMICDET.LOSS_WEIGHTS.T_BOX = 1.0
    # paper: 1 (mimic loss, classification path)
    _C.MODEL.MIMICDET.LOSS_WEIGHTS.MIMIC_CLS = 1.0
    # paper: 1 (mimic loss, regression path)
    _C.MODEL.MIMICDET.LOSS_WEIGHTS.MIMIC_REG = 1.0

    _C.MODEL.MIMICDET.REFINE = CN()
    # paper: the refinement module and the S-head run on P3..P7
    _C.MODEL.MIMICDET.REFINE.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # paper: one square anchor per location, side = 4 x stride
    _C.MODEL.MIMICDET.REFINE.ANCHOR_SIZE_PER_STRIDE = 4.0
    # default (ours): anchors centred in their cell, as FCOS places its points
    _C.MODEL.MIMICDET.REFINE.ANCHOR_OFFSET = 0.5
    # paper: 256-channel 3x3 conv before the objectness and box branches
    _C.MODEL.MIMICDET.REFINE.CONV_DIM = 256
    # paper: one 3x3 conv; more (ours) make a tower like FCOS's four, for weak or frozen features
    _C.MODEL.MIMICDET.REFINE.NUM_CONVS = 1
    # default (ours): no normalization after those convs, as the paper describes none; "GN" adds
    # GroupNorm as detectron2's FCOS head has
    _C.MODEL.MIMICDET.REFINE.NORM = ""
    # paper: a GT trains on the levels whose "valid scale range" holds it (ranges not given).
    # default (ours): "anchor_scale", each level's range centred in log scale on its anchor side
    # (ANCHOR_SIZE_PER_STRIDE x stride); "canonical" is detectron2's RoI-pooler rule below, made
    # for RoI pooling on P2..P5: with 4 x stride anchors it leaves P6 and P7 no positive on COCO
    _C.MODEL.MIMICDET.REFINE.LEVEL_ASSIGNMENT = "anchor_scale"
    # default (ours): half-width of each level's scale range, in octaves: 0.5 makes the ranges
    # adjacent and disjoint, one level per GT; 1.0 is FoveaBox's overlapping [a / 2, 2a), which
    # scored 7.1 against 7.5 AP over three DeepForest seeds (docs/level_assignment.md)
    _C.MODEL.MIMICDET.REFINE.SCALE_RANGE_HALF_WIDTH = 0.5
    # "canonical" rule only: detectron2's canonical box size and its level (stride 16)
    _C.MODEL.MIMICDET.REFINE.CANONICAL_BOX_SIZE = 224
    _C.MODEL.MIMICDET.REFINE.CANONICAL_LEVEL = 4
    # default (notes): positive centres lie in the GT shrunk to 0.3 of its width and height
    _C.MODEL.MIMICDET.REFINE.CENTER_SAMPLING_RATIO = 0.3
    # default (ours): the shrunk box is at least one cell wide, so small GTs keep a positive
    _C.MODEL.MIMICDET.REFINE.MIN_CENTER_RADIUS = 0.5
    # default (ours): no ignore band, every anchor that is not positive is a negative; a ratio
    # above CENTER_SAMPLING_RATIO leaves the anchors of a GT's level whose centres lie in the GT
    # shrunk to it, and are not positive, out of the objectness loss (FoveaBox uses 0.3 / 0.4)
    _C.MODEL.MIMICDET.REFINE.IGNORE_SAMPLING_RATIO = 0.0
    # default (ours): Faster R-CNN RPN delta weights for the anchor -> refined box step
    _C.MODEL.MIMICDET.REFINE.BBOX_REG_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
    # paper: L1 on the deltas ("smooth_l1" with beta 0); "giou" (ours) is detectron2's GIoU loss
    # on the decoded boxes, as FCOS trains its boxes
    _C.MODEL.MIMICDET.REFINE.BBOX_REG_LOSS_TYPE = "smooth_l1"
    # default (ours): RetinaNet's objectness prior so the many negatives don't swamp early BCE
    _C.MODEL.MIMICDET.REFINE.PRIOR_PROB = 0.01
    # paper: BCE objectness (gamma 0, alpha -1 make fvcore's sigmoid focal loss plain BCE);
    # RetinaNet's 0.25 / 2.0 turn it into a focal loss that down-weights the easy negatives
    _C.MODEL.MIMICDET.REFINE.FOCAL_LOSS_ALPHA = -1.0
    _C.MODEL.MIMICDET.REFINE.FOCAL_LOSS_GAMMA = 0.0
    # default (ours): top-k refined boxes per level before the training NMS, as detectron2's RPN
    _C.MODEL.MIMICDET.REFINE.PRE_NMS_TOPK_TRAIN = 2000
    # paper: NMS IoU of the refined boxes in training
    _C.MODEL.MIMICDET.REFINE.NMS_THRESH_TRAIN = 0.8
    # paper: refined boxes kept per image in training (the S-head samples, the T-head pool)
    _C.MODEL.MIMICDET.REFINE.POST_NMS_TOPK_TRAIN = 2000
    # paper: refined boxes per image, by objectness, that the S-head scores at inference
    _C.MODEL.MIMICDET.REFINE.TOPK_TEST = 1000

    _C.MODEL.MIMICDET.S_HEAD = CN()
    # paper: channels of the guided deformable conv
    _C.MODEL.MIMICDET.S_HEAD.CONV_DIM = 256
    # paper: 3x3 deformable conv on P3 (compute), 5x5 on P4..P7; one entry per REFINE level
    _C.MODEL.MIMICDET.S_HEAD.KERNEL_SIZES = [3, 5, 5, 5, 5]
    # paper: hidden widths of the offset micro-network (1x1 convs 64 -> 128 -> 2*k*k)
    _C.MODEL.MIMICDET.S_HEAD.OFFSET_DIMS = [64, 128]
    # paper: the micro-network alone turns the deltas into offsets (False, starting from a
    # plain conv); True (ours) adds the offsets that lay the kernel's taps over the refined box
    # in closed form, so the micro-network learns a residual (AlignDet's RoIConv)
    _C.MODEL.MIMICDET.S_HEAD.BOX_ALIGNED_OFFSETS = False
    # default (ours): the refinement is trained by its own losses; offsets follow its boxes
    _C.MODEL.MIMICDET.S_HEAD.DETACH_GUIDANCE = True
    # paper: 1024-d classification and regression features, as the T-head's
    _C.MODEL.MIMICDET.S_HEAD.FC_DIM = 1024
    # paper: a refined box is positive at IoU >= 0.6 with a GT, as in the T-head
    _C.MODEL.MIMICDET.S_HEAD.IOU_THRESHOLD = 0.6
    # paper: the classification loss is taken over 128 refined boxes per image
    _C.MODEL.MIMICDET.S_HEAD.BATCH_SIZE_PER_IMAGE = 128
    # paper: "top_loss", the 128 boxes with the highest loss, foreground and background alike;
    # "positives_first" (ours, the earlier default): every positive, then the hardest negatives
    _C.MODEL.MIMICDET.S_HEAD.HARD_MINING = "top_loss"
    # "positives_first" only (ours, SSD's mining): at least this many negatives per positive, so
    # that an image with 128+ positive refined boxes still trains on background
    _C.MODEL.MIMICDET.S_HEAD.NEG_POS_RATIO = 3.0
    # paper: deltas of the S-head relative to the refined box, Fast R-CNN weights
    _C.MODEL.MIMICDET.S_HEAD.BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
    # paper: L1 on the deltas, as the T-head ("smooth_l1" with beta 0); "giou" as REFINE's
    _C.MODEL.MIMICDET.S_HEAD.BBOX_REG_LOSS_TYPE = "smooth_l1"
    # paper: a detection's score is the S-head's class probability (False). True (ours) scores
    # it by the geometric mean of that and the refinement's objectness, as FCOS multiplies in
    # its centerness: it helps while the S-head is undertrained (the short CPU schedules)
    _C.MODEL.MIMICDET.S_HEAD.SCORE_WITH_OBJECTNESS = False
    # paper: COCO evaluation score threshold
    _C.MODEL.MIMICDET.S_HEAD.SCORE_THRESH_TEST = 0.005
    # paper: per-class NMS IoU at inference
    _C.MODEL.MIMICDET.S_HEAD.NMS_THRESH_TEST = 0.6

    _C.MODEL.MIMICDET.T_HEAD = CN()
    # default (ours): False drops the T-head from training (the paper's "S-head alone" row)
    _C.MODEL.MIMICDET.T_HEAD.ENABLED = True
    # paper: four 3x3 convs in the regression path
    _C.MODEL.MIMICDET.T_HEAD.NUM_CONV = 4
    # paper: 256 channels in those convs
    _C.MODEL.MIMICDET.T_HEAD.CONV_DIM = 256
    # paper: two fcs before the class logits
    _C.MODEL.MIMICDET.T_HEAD.NUM_FC = 2
    # paper: 1024-d fcs in both paths (the regression path has one)
    _C.MODEL.MIMICDET.T_HEAD.FC_DIM = 1024
    # paper: "shared", the T-head pools from the backbone and pyramid the S-head trains. The
    # paper's "shared versus separated backbone" ablation puts the T-head on a pyramid of its own
    # (a second MODEL.BACKBONE, `t_backbone.*` in checkpoints, training only):
    #   "separate_joint": built from the same initialisation as the shared one, trained jointly
    #     by the T-head's losses (the mimic gradient stops at the T-head, as DETACH_TEACHER says)
    #   "separate_frozen": the T-head and its pyramid loaded from a trained MimicDet checkpoint
    #     (FROZEN_WEIGHTS: its backbone.* and roi_heads.*) and frozen; no T-head loss
    # The deploy model is the same in every mode (the T-head and its pyramid never run there).
    _C.MODEL.MIMICDET.T_HEAD.BACKBONE = "shared"
    # "separate_frozen" only: the trained MimicDet checkpoint the frozen T-head comes from
    _C.MODEL.MIMICDET.T_HEAD.FROZEN_WEIGHTS = ""

    _C.MODEL.MIMICDET.MIMIC = CN()
    # paper: mimic loss on; False is the "S-head alone" ablation (no mimic loss)
    _C.MODEL.MIMICDET.MIMIC.ENABLED = True
    # paper: dual path; ["cls"] or ["reg"] are the single-path ablations
    _C.MODEL.MIMICDET.MIMIC.PATHS = ["cls", "reg"]
    # default (notes): B_m holds up to 64 T-head samples per image
    _C.MODEL.MIMICDET.MIMIC.NUM_PER_IMAGE = 64
    # default (notes): the mimic gradient trains the S-head and backbone, not the T-head
    _C.MODEL.MIMICDET.MIMIC.DETACH_TEACHER = True

    # not in the paper or detectron2 (ours): also flip training images top to bottom, with
    # probability 0.5 and independently of INPUT.RANDOM_FLIP, for views that have no "up" (aerial
    # tiles): with RANDOM_FLIP "horizontal" the four flips include the 180 degree rotation. The
    # DeepForest configs leave it off: it cost ~4 AP at 200 iterations there, 2.3 at 600
    # (issue 5's note)
    _C.INPUT.RANDOM_FLIP_VERTICAL = False
