"""Config keys of the distiller (``MODEL.DISTILL``); each says if a paper fixes it or we did."""

from detectron2.config import CfgNode as CN

__all__ = ["add_distill_config"]


def add_distill_config(cfg):
    """Add ``MODEL.DISTILL`` and nothing else (detectron2's keys keep their values)."""
    _C = cfg
    _C.MODEL.DISTILL = CN()
    # the student's own meta-architecture (MODEL.META_ARCHITECTURE is "Distiller"); it reads
    # every other key of this config as if it were trained alone
    _C.MODEL.DISTILL.STUDENT_META_ARCHITECTURE = "RetinaNet"
    # FPN levels imitated, by the student's and the teacher's feature names (same names, sizes)
    _C.MODEL.DISTILL.FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # default (ours; FGFI's code starts imitating at iteration 400): iterations before the KD
    # terms count (they are still computed, multiplied by 0, so DDP sees every parameter used)
    _C.MODEL.DISTILL.WARMUP_ITERS = 0
    # kernel of the adaptation conv from the student's feature to the teacher's width, one per
    # level, shared by the feature-imitation terms (paper: 3x3 in FGFI's and DeFeat's code)
    _C.MODEL.DISTILL.ADAPTER_KERNEL = 3
    # the one level a GT box marks in FGFI's and DeFeat's masks (paper code: the DeFeat
    # repository's rule for both, mmdetection's RoI rule counted on the imitated levels): a box
    # of size s = sqrt(w * h) goes to level floor(log2(s / GT_LEVEL_SCALE)) from the finest,
    # clamped to the last. 56: under 112 px the finest (a RetinaNet's P3, a Faster R-CNN's P2),
    # 112-224 px the next, and so on. detectron2's RoI rule (224 px at P4, counted absolutely)
    # puts each box one level finer than this on P3..P7
    _C.MODEL.DISTILL.GT_LEVEL_SCALE = 56.0

    _C.MODEL.DISTILL.TEACHER = CN()
    # the teacher's own config file (yacs .yaml or LazyConfig .py); it is built and loaded as a
    # separate model
    _C.MODEL.DISTILL.TEACHER.CONFIG_FILE = ""
    # the teacher's checkpoint; every tensor must match (mimicdet.distill.load_teacher_weights)
    _C.MODEL.DISTILL.TEACHER.WEIGHTS = ""
    # default (ours): False refuses a teacher without weights; True only for tests and smoke runs
    _C.MODEL.DISTILL.TEACHER.ALLOW_RANDOM = False
    # overrides of the teacher's config, as train_net's command line takes them: KEY VALUE pairs
    # for a .yaml, "key=value" items for a .py. Keys that no parameter shows, such as anchor sizes,
    # must reach the teacher's config this way or its strict load would not notice them (ours)
    _C.MODEL.DISTILL.TEACHER.OPTS = []

    # FGFI (Wang et al., CVPR 2019): loss_kd_fgfi
    _C.MODEL.DISTILL.FGFI = CN()
    # paper code: 0.01 on one VGG map; 0 switches the term off
    _C.MODEL.DISTILL.FGFI.WEIGHT = 0.0
    # paper: psi = 0.5, a GT's threshold as a share of its best anchor IoU; on an FPN over the
    # anchors of its own level (GT_LEVEL_SCALE), where alone it marks cells (paper code: the
    # DeFeat repository's FGFI port)
    _C.MODEL.DISTILL.FGFI.PSI = 0.5

    # DeFeat (Guo et al., CVPR 2021): loss_kd_defeat_fg, loss_kd_defeat_bg
    _C.MODEL.DISTILL.DEFEAT = CN()
    # paper (COCO, per the authors): 4 foreground, 16 background (released VOC config: 3, 12),
    # on the authors' normaliser (mimicdet.distill.defeat_losses)
    _C.MODEL.DISTILL.DEFEAT.FG_WEIGHT = 0.0
    _C.MODEL.DISTILL.DEFEAT.BG_WEIGHT = 0.0

    # Rank Mimicking and Prediction-guided Feature Imitation (Li et al., AAAI 2022):
    # loss_kd_rank, loss_kd_pfi; both read the teacher's predictions at the student's anchors (same
    # levels and anchors): a dense teacher's head, or, for a two-stage teacher (ours), its RPN and
    # its second stage (mimicdet/distill/dense_view.py)
    _C.MODEL.DISTILL.RANK = CN()
    # public port: 4
    _C.MODEL.DISTILL.RANK.WEIGHT = 0.0
    # a two-stage teacher's score of each candidate anchor at the GT's class (ours): "roi_head"
    # runs its box head and classifier on the candidates as proposals (the class probability as
    # log-odds, the scale of a dense student's sigmoid logits); "rpn" reads its class-agnostic
    # objectness, for one class only (the DeepForest benchmark's RM+PFI row until 2026-12-03).
    # PFI always compares the RPN's objectness with the student's largest class logit per anchor
    # (ours; the logit itself with one class)
    _C.MODEL.DISTILL.RANK.TWO_STAGE_SCORES = "roi_head"
    # what the softmax over a GT's candidates reads: "probability", each score's sigmoid (the
    # public port's; the paper says "scores"), or "logit", the log-odds themselves (ours until
    # 2026-12-07: undamped by the sigmoid's slope, at the port's weight it pulled a ten-class
    # student's classifier as hard as its own loss and slowed it to a quarter of RetinaNet's AP at
    # 600 iterations; docs/distillation.md)
    _C.MODEL.DISTILL.RANK.SCORE = "probability"
    _C.MODEL.DISTILL.PFI = CN()
    # public port: 1.5
    _C.MODEL.DISTILL.PFI.WEIGHT = 0.0
    # what PFI's weight squares: "logit", the teacher-student logit gap (the paper's as our notes
    # read it, between two dense detectors whose logits share a loss and a calibration), or
    # "probability", the gap of their sigmoids (ours, for an RPN teacher: its objectness sits far
    # below a focal-loss student's logits where both say "background", -11.4 against -4.4 on
    # Fashion scenes, so the logit gap weighs that offset almost as much as a missed object;
    # probabilities agree wherever both are near 0; docs/distillation.md)
    _C.MODEL.DISTILL.PFI.PREDICTION_GAP = "logit"
