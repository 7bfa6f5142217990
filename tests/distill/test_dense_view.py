"""Rank Mimicking and PFI from a two-stage teacher: its RPN's objectness, one logit per anchor,
and its second stage's class scores of the candidate anchors."""

import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage

from mimicdet import get_mimicdet_cfg
from mimicdet.distill.dense_view import candidate_matches

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
    # an RPN that scores every anchor alike changes nothing: it only picks the candidates (by IoU)
    rpn_objectness = model.teacher.model.proposal_generator.rpn_head.objectness_logits
    flatten_classifier(rpn_objectness.weight, rpn_objectness.bias)
    assert rank_loss(model, inputs).item() == pytest.approx(random_teacher.item())
    # a second stage that scores every box alike: the teacher's ranking is uniform too, so there
    # is nothing left to mimic
    flatten_classifier(roi_predictor.weight, roi_predictor.bias)
    assert rank_loss(model, inputs).item() == pytest.approx(0.0, abs=1e-6)


def test_the_second_stage_score_is_the_teachers_class_probability_as_log_odds(rm_pfi_cfg):
    model = build_model(two_classes(rm_pfi_cfg))
    teacher, view = model.teacher.model, model.teacher_dense
    classifier = teacher.roi_heads.box_predictor.cls_score  # class 0, class 1, background
    flatten_classifier(classifier.weight, classifier.bias)
    with torch.no_grad():
        classifier.bias.copy_(torch.tensor([1.0, 0.0, 2.0]))
        features = teacher.backbone(torch.randn(1, 3, 128, 128))
        boxes = Boxes(torch.tensor([[10.0, 10.0, 60.0, 50.0], [-20.0, 30.0, 150.0, 90.0]]))
        (scores,) = view.candidate_scores(
            features, None, boxes, [torch.tensor([0, 1])], [(128, 128)]
        )
    probs = torch.softmax(torch.tensor([1.0, 0.0, 2.0]), dim=0)[:2]
    log_odds = torch.log(probs / (1 - probs))
    assert torch.allclose(scores, log_odds.expand(2, 2), atol=1e-5)


def per_level_logits(flat, features, num_anchors, num_classes):
    """The inverse of detectron2's ``permute_to_N_HWA_K`` over concatenated levels."""
    logits, start = [], 0
    for x in features:
        n, _, h, w = x.shape
        part = flat[:, start : start + h * w * num_anchors].reshape(n, h, w, num_anchors, -1)
        logits.append(part.permute(0, 3, 4, 1, 2).reshape(n, num_anchors * num_classes, h, w))
        start += h * w * num_anchors
    assert torch.equal(cat_flat(logits, num_classes), flat)
    return logits


def cat_flat(logits, num_classes):
    return torch.cat([permute_to_N_HWA_K(x, num_classes) for x in logits], dim=1)


def test_a_student_that_ranks_the_candidates_as_the_teacher_does_has_nothing_to_mimic(
    rm_pfi_cfg, make_inputs
):
    torch.manual_seed(0)
    model = build_model(two_classes(rm_pfi_cfg)).train()
    # GT classes 0 and 1, each the shape of a 50.8 px P3 anchor: its 4 neighbours (8 px away)
    # overlap it by IoU 0.73, above the RPN matcher's 0.7
    boxes = ((38.6, 38.6, 89.4, 89.4), (142.6, 110.6, 193.4, 161.4))
    inputs = make_inputs(num_images=2, size=256, boxes_per_image=boxes)
    gt = [x["instances"] for x in inputs]
    student, view = model.student, model.teacher_dense
    images = student.preprocess_image(inputs)
    features = student.backbone(images.tensor)
    levels = [features[f] for f in student.head_in_features]
    anchors = student.anchor_generator(levels)
    with torch.no_grad():
        t_features = model.teacher.model.backbone(
            model.teacher.model.preprocess_image(inputs).tensor
        )
        t_logits = view.class_logits(t_features)
        matches = candidate_matches(view.assigner, anchors, gt)
        candidates = [(m >= 0).nonzero().squeeze(1) for m in matches]
        t_scores = view.candidate_scores(
            t_features, t_logits, Boxes.cat(anchors), candidates, images.image_sizes
        )
    # several candidates per GT, or every ranking would be trivially equal
    assert min(int((m == g).sum()) for m in matches for g in range(len(boxes))) >= 2
    # a student scoring every candidate as the teacher does (random elsewhere)
    flat = cat_flat(student.head(levels)[0], 2).detach().clone()
    for i, idx in enumerate(candidates):
        flat[i, idx] = t_scores[i]
    num_anchors = student.anchor_generator.num_cell_anchors[0]
    sizes = images.image_sizes
    same = per_level_logits(flat, levels, num_anchors, 2)
    assert model._rank_loss(anchors, same, t_features, t_logits, sizes, gt) < 1e-8
    # the same scores under the other class: the GT's class column is the one compared (an
    # untrained teacher's probabilities differ little, hence a small but clear loss)
    swapped = per_level_logits(flat.flip(-1), levels, num_anchors, 2)
    assert model._rank_loss(anchors, swapped, t_features, t_logits, sizes, gt) > 1e-5


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
    # per anchor in detectron2's own flattening of a dense head's output
    best = permute_to_N_HWA_K(student, 2).amax(dim=-1)
    assert torch.equal(permute_to_N_HWA_K(comparable, 1).squeeze(-1), best)


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


def test_rank_candidates_tool_reads_the_teachers_ranking_of_each_gts_candidates(
    rm_pfi_cfg, make_inputs
):
    """tools/rank_candidates.py --teacher-weights: one ranking per GT with two or more
    candidates; the probabilities' softmax is never more peaked than the logits' (sigmoids lie
    closer together than their logits)."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from rank_candidates import teacher_rankings

    torch.manual_seed(0)
    model = build_model(two_classes(rm_pfi_cfg)).eval()
    # the shapes of two 50.8 px P3 anchors: each has its 4 neighbours as candidates too
    boxes = ((38.6, 38.6, 89.4, 89.4), (142.6, 110.6, 193.4, 161.4))
    inputs = make_inputs(num_images=2, size=256, boxes_per_image=boxes)
    rankings = teacher_rankings(model.student, model.teacher.model, [inputs])
    assert len(rankings) == 4  # 2 GTs in each of 2 images
    for spread, shares in rankings:
        assert spread >= 0.0
        assert 0.0 < shares["probability"] <= shares["logit"] + 1e-6 <= 1.0 + 1e-6
