"""Rank Mimicking and PFI from a two-stage teacher: its RPN's objectness, one logit per anchor."""

import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from mimicdet import get_mimicdet_cfg

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)
RM_PFI = os.path.join(ROOT, "configs", "DeepForest", "distill", "retinanet_rm_pfi_from_frcnn.yaml")


@pytest.fixture
def rm_pfi_cfg(monkeypatch):
    monkeypatch.chdir(ROOT)  # the config's teacher path is relative to the repository
    cfg = get_mimicdet_cfg(RM_PFI)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.DISTILL.TEACHER.WEIGHTS, cfg.MODEL.DISTILL.TEACHER.ALLOW_RANDOM = "", True
    return cfg


def test_a_faster_rcnn_teacher_gives_one_rpn_logit_per_student_anchor(rm_pfi_cfg, make_inputs):
    torch.manual_seed(0)
    model = build_model(rm_pfi_cfg).train()
    assert model.teacher_dense.assigner is model.teacher.model.proposal_generator
    inputs = make_inputs(num_images=2, size=128, boxes_per_image=((8, 8, 60, 50), (40, 30, 90, 90)))
    for x in inputs:
        x["instances"].gt_classes[:] = 0  # one class, as DeepForest
    images = model.student.preprocess_image(inputs)
    features = model.student.backbone(images.tensor)
    s_logits = model.student.head([features[f] for f in model.student.head_in_features])[0]
    t_features = model.teacher.model.backbone(images.tensor)
    t_logits = model.teacher_dense.class_logits(t_features)
    assert [t.shape for t in t_logits] == [s.shape for s in s_logits]
    with EventStorage():
        losses = model(inputs)
    assert {"loss_kd_rank", "loss_kd_pfi"} <= set(losses)
    assert losses["loss_kd_pfi"] > 0 and torch.isfinite(losses["loss_kd_rank"])


def test_an_rpn_teacher_with_several_classes_is_refused(rm_pfi_cfg):
    rm_pfi_cfg.MODEL.RETINANET.NUM_CLASSES = 2
    with pytest.raises(ValueError, match="only when there is one"):
        build_model(rm_pfi_cfg)


def test_a_student_with_other_anchors_than_the_teachers_is_refused(rm_pfi_cfg):
    rm_pfi_cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    with pytest.raises(ValueError, match="same anchors"):
        build_model(rm_pfi_cfg)
