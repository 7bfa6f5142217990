"""Rank Mimicking and PFI from a two-stage teacher: its RPN's objectness, one logit per anchor,
and its second stage's class scores of the candidate anchors."""

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


def two_classes(cfg):
    cfg.MODEL.RETINANET.NUM_CLASSES = 2
    cfg.MODEL.DISTILL.TEACHER.OPTS = ["MODEL.ROI_HEADS.NUM_CLASSES", "2"]
    return cfg


def rank_loss(model, inputs):
    """The weighted Rank Mimicking term of one training step."""
    with EventStorage():
        return model(inputs)["loss_kd_rank"]


def flatten_classifier(head_weight, head_bias):
    """Zero a classifier's weights: every input then gets the same scores."""
    with torch.no_grad():
        head_weight.zero_()
        head_bias.zero_()


def test_rank_mimicking_reads_the_teachers_second_stage_for_several_classes(
    rm_pfi_cfg, make_inputs
):
    torch.manual_seed(0)
    model = build_model(two_classes(rm_pfi_cfg)).train()
    inputs = make_inputs(num_images=2, size=128, boxes_per_image=((8, 8, 60, 50), (40, 30, 90, 90)))
    roi_predictor = model.teacher.model.roi_heads.box_predictor.cls_score
    # the student scores every anchor alike: its rank distribution over any candidates is uniform
    cls_conv = model.student.head.cls_score
    flatten_classifier(cls_conv.weight, cls_conv.bias)
    random_teacher = rank_loss(model, inputs)
    assert random_teacher > 0  # the teacher ranks the candidates, the student does not
    # a second stage that scores every box alike: the teacher's ranking is uniform too, whatever
    # its RPN says, so there is nothing left to mimic
    flatten_classifier(roi_predictor.weight, roi_predictor.bias)
    assert rank_loss(model, inputs).item() == pytest.approx(0.0, abs=1e-6)


def test_rpn_scores_for_one_class_ignore_the_second_stage(rm_pfi_cfg, make_inputs):
    rm_pfi_cfg.MODEL.DISTILL.RANK.TWO_STAGE_SCORES = "rpn"
    torch.manual_seed(0)
    model = build_model(rm_pfi_cfg).train()
    inputs = make_inputs(num_images=2, size=128, boxes_per_image=((8, 8, 60, 50), (40, 30, 90, 90)))
    for x in inputs:
        x["instances"].gt_classes[:] = 0
    torch.manual_seed(1)
    before = rank_loss(model, inputs)
    roi_predictor = model.teacher.model.roi_heads.box_predictor.cls_score
    flatten_classifier(roi_predictor.weight, roi_predictor.bias)
    torch.manual_seed(1)
    assert rank_loss(model, inputs).item() == pytest.approx(before.item()) and before > 0


def test_pfi_compares_an_rpn_teachers_objectness_with_each_anchors_best_class(rm_pfi_cfg):
    model = build_model(two_classes(rm_pfi_cfg))
    num_anchors = model.student.anchor_generator.num_cell_anchors[0]
    student = torch.randn(2, num_anchors * 2, 4, 5)
    comparable = model.teacher_dense.comparable_student_logits(student)
    assert comparable.shape == (2, num_anchors, 4, 5)
    for a in range(num_anchors):  # detectron2 orders a dense head's channels anchor-major
        best = torch.maximum(student[:, 2 * a], student[:, 2 * a + 1])
        assert torch.equal(comparable[:, a], best)


def test_rpn_scores_with_several_classes_are_refused(rm_pfi_cfg):
    two_classes(rm_pfi_cfg).MODEL.DISTILL.RANK.TWO_STAGE_SCORES = "rpn"
    with pytest.raises(ValueError, match="only when there is one"):
        build_model(rm_pfi_cfg)


def test_an_unknown_two_stage_score_source_is_refused(rm_pfi_cfg):
    rm_pfi_cfg.MODEL.DISTILL.RANK.TWO_STAGE_SCORES = "roi_heads"
    with pytest.raises(ValueError, match="TWO_STAGE_SCORES 'roi_heads'"):
        build_model(rm_pfi_cfg)


def test_a_teacher_with_other_classes_than_the_students_is_refused(rm_pfi_cfg):
    rm_pfi_cfg.MODEL.RETINANET.NUM_CLASSES = 2  # the teacher keeps DeepForest's one class
    with pytest.raises(ValueError, match="ROI heads have 1 classes, the student 2"):
        build_model(rm_pfi_cfg)


def test_a_student_with_other_anchors_than_the_teachers_is_refused(rm_pfi_cfg):
    rm_pfi_cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    with pytest.raises(ValueError, match="same anchors"):
        build_model(rm_pfi_cfg)
