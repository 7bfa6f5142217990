"""MimicDet end to end: losses, gradient flow, inference path, ablation switches."""

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from conftest import assert_same_detections
from mimicdet.modeling import MimicDet
from mimicdet.modeling.meta_arch import HEADS

ALL_LOSSES = {
    "loss_refine_cls",
    "loss_refine_box",
    "loss_s_cls",
    "loss_s_box",
    "loss_t_cls",
    "loss_t_box",
    "loss_mimic_cls",
    "loss_mimic_reg",
}


def _train_losses(model, inputs):
    model.train()
    with EventStorage():
        return model(inputs)


def test_loss_dict_keys_and_finite(cfg, make_inputs):
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, MimicDet)
    losses = _train_losses(model, make_inputs())
    assert set(losses) == ALL_LOSSES
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.s_head.cls_score.weight.grad.abs().sum() > 0
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("detach", [True, False])
def test_mimic_gradient_reaches_s_head_and_t_head_only_if_not_detached(cfg, make_inputs, detach):
    cfg.MODEL.MIMICDET.MIMIC.DETACH_TEACHER = detach
    torch.manual_seed(0)
    model = build_model(cfg)
    losses = _train_losses(model, make_inputs())
    (losses["loss_mimic_cls"] + losses["loss_mimic_reg"]).backward()

    def grad_norm(module):
        return sum(p.grad.abs().sum() for p in module.parameters() if p.grad is not None)

    assert grad_norm(model.s_head.cls_score) > 0 and grad_norm(model.s_head.reg_fc) > 0
    assert grad_norm(model.backbone) > 0
    t_head_grad = grad_norm(model.roi_heads)
    assert (t_head_grad == 0) if detach else (t_head_grad > 0)


def test_inference_runs_no_t_head_and_no_p2(cfg, make_inputs):
    cfg.TEST.DETECTIONS_PER_IMAGE = 7
    model = build_model(cfg).eval()
    called = []
    for name, module in model.named_modules():
        if name.startswith("roi_heads") or name in (
            "backbone.fpn_lateral2",
            "backbone.fpn_output2",
        ):
            module.register_forward_hook(lambda m, i, o, name=name: called.append(name))
    inputs = make_inputs(num_images=2, size=96)
    inputs[1]["height"], inputs[1]["width"] = 192, 144
    with torch.no_grad():
        outputs = model(inputs)
    assert called == []
    for out, size in zip(outputs, [(96, 96), (192, 144)]):
        inst = out["instances"]
        assert inst.image_size == size
        assert {"pred_boxes", "scores", "pred_classes"} <= set(inst.get_fields())
        assert 0 < len(inst) <= 7
        assert (inst.scores > 0.005).all() and (inst.pred_classes < 2).all()

    # the same model in training mode does run them
    _train_losses(model, make_inputs())
    assert "roi_heads" in called and "backbone.fpn_lateral2" in called


def test_images_without_annotations_train(cfg, make_inputs):
    inputs = make_inputs(num_images=2)
    inputs[0]["instances"] = inputs[0]["instances"][[]]
    inputs[1]["instances"] = Instances((96, 96), gt_boxes=Boxes(torch.zeros(0, 4)))
    inputs[1]["instances"].gt_classes = torch.zeros(0, dtype=torch.int64)
    model = build_model(cfg)
    losses = _train_losses(model, inputs)
    assert set(losses) == ALL_LOSSES
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_refine_box"] == 0 and losses["loss_s_box"] == 0
    sum(losses.values()).backward()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["MODEL.MIMICDET.MIMIC.ENABLED", False],
            ALL_LOSSES - {"loss_mimic_cls", "loss_mimic_reg"},
        ),
        (
            ["MODEL.MIMICDET.MIMIC.ENABLED", False, "MODEL.MIMICDET.T_HEAD.ENABLED", False],
            {"loss_refine_cls", "loss_refine_box", "loss_s_cls", "loss_s_box"},
        ),
        (["MODEL.MIMICDET.MIMIC.PATHS", ["cls"]], ALL_LOSSES - {"loss_mimic_reg"}),
        (["MODEL.MIMICDET.MIMIC.PATHS", ["reg"]], ALL_LOSSES - {"loss_mimic_cls"}),
        (["MODEL.MIMICDET.STAGGERED", False], ALL_LOSSES),
    ],
)
def test_ablation_switches(cfg, make_inputs, overrides, expected):
    cfg.merge_from_list(overrides)
    model = build_model(cfg)
    assert (model.roi_heads is None) == (not cfg.MODEL.MIMICDET.T_HEAD.ENABLED)
    losses = _train_losses(model, make_inputs())
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())


def test_mimicking_on_or_off_gives_the_same_checkpoint_keys(cfg):
    """The mimic loss is a submodule without state: a checkpoint trained without mimicking loads
    key for key into a model with it (tools/mimic_agreement.py measures such checkpoints)."""
    with_mimic = build_model(cfg)
    assert with_mimic.mimic_loss.paths == list(cfg.MODEL.MIMICDET.MIMIC.PATHS)
    cfg.MODEL.MIMICDET.MIMIC.ENABLED = False
    without = build_model(cfg)
    assert without.mimic_loss is None
    assert with_mimic.state_dict().keys() == without.state_dict().keys()


def test_loss_weights_scale_their_terms(cfg, make_inputs):
    inputs = make_inputs()
    torch.manual_seed(0)
    base = _train_losses(build_model(cfg), inputs)
    cfg.MODEL.MIMICDET.LOSS_WEIGHTS.S_CLS = 0.5
    torch.manual_seed(0)
    scaled = _train_losses(build_model(cfg), inputs)
    torch.testing.assert_close(scaled["loss_s_cls"], 0.5 * base["loss_s_cls"])
    torch.testing.assert_close(scaled["loss_refine_cls"], base["loss_refine_cls"])


@pytest.mark.parametrize("with_objectness", [False, True])
def test_detection_scores_with_and_without_objectness(cfg, with_objectness):
    cfg.MODEL.MIMICDET.S_HEAD.SCORE_WITH_OBJECTNESS = with_objectness
    cfg.MODEL.MIMICDET.S_HEAD.SCORE_THRESH_TEST = 0.0
    model = build_model(cfg).eval()
    refined = Instances((100, 100))
    # two boxes far apart, so the NMS keeps all four (box, class) detections
    refined.proposal_boxes = Boxes(torch.tensor([[10.0, 10, 40, 40], [60, 60, 90, 90]]))
    refined.objectness_logits = torch.tensor([0.0, 2.0])
    logits = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.5]])  # two classes and background
    result = model.inference_single_image(refined, logits, torch.zeros(2, 4))
    expected = logits.softmax(dim=1)[:, :2]
    if with_objectness:
        expected = (expected * refined.objectness_logits.sigmoid()[:, None]).sqrt()
    assert torch.allclose(result.scores.sort().values, expected.flatten().sort().values)


def test_teacher_inference_scores_with_the_t_head_and_leaves_the_model_in_eval(cfg, make_inputs):
    cfg.MODEL.MIMICDET.S_HEAD.SCORE_WITH_OBJECTNESS = False
    cfg.TEST.DETECTIONS_PER_IMAGE = 7
    model = build_model(cfg).eval()
    inputs = make_inputs(num_images=2, size=96)
    inputs[1]["height"], inputs[1]["width"] = 192, 144
    called = []
    for name in ("roi_heads", "backbone.fpn_lateral2"):
        model.get_submodule(name).register_forward_hook(lambda *a, name=name: called.append(name))
    predictor = model.roi_heads.box_predictor.cls_score
    with torch.no_grad():
        predictor.weight.zero_()
        student = model(inputs)
        # the T-head sure of class 0 everywhere: every kept refined box becomes a detection
        predictor.bias.copy_(torch.tensor([10.0, -10.0, -10.0]))
        sure = model.teacher_inference(inputs)
        # and sure of "background": none does, whatever the S-head thinks
        predictor.bias.copy_(torch.tensor([-10.0, -10.0, 10.0]))
        none = model.teacher_inference(inputs)
    assert called == ["backbone.fpn_lateral2"] * 2
    assert not model.training and not model.backbone.training
    for s, t, n, size in zip(student, sure, none, [(96, 96), (192, 144)]):
        assert t["instances"].image_size == size
        assert len(t["instances"]) == cfg.TEST.DETECTIONS_PER_IMAGE
        assert (t["instances"].scores > 0.99).all() and (t["instances"].pred_classes == 0).all()
        assert len(n["instances"]) == 0 and len(s["instances"]) > 0


def _box_rows(outputs):
    """Each image's detected boxes as a sorted list of rows: the detections as a set."""
    return [sorted(map(tuple, o["instances"].pred_boxes.tensor.tolist())) for o in outputs]


def test_mixed_inference_takes_one_heads_classes_and_the_other_heads_boxes(cfg, make_inputs):
    cfg.MODEL.MIMICDET.S_HEAD.SCORE_WITH_OBJECTNESS = False
    model = build_model(cfg).eval()
    inputs = make_inputs(num_images=2, size=96)
    with torch.no_grad():
        # the S-head's classes and boxes are the deployed detector's detections
        assert_same_detections(model(inputs), model.mixed_inference(inputs, "s_head", "s_head"))
        # every refined box a detection (no NMS), the S-head sure of class 1 and the T-head of
        # class 0, the T-head's boxes larger than the refined boxes
        model.test_nms_thresh, model.max_detections_per_image = 1.0, 10**4
        for predictor, label in [
            (model.s_head.cls_score, 1), (model.roi_heads.box_predictor.cls_score, 0)
        ]:  # fmt: skip
            predictor.weight.zero_()
            predictor.bias.fill_(-10.0)
            predictor.bias[label] = 10.0
        t_deltas = model.roi_heads.box_predictor.bbox_pred
        t_deltas.weight.zero_()
        t_deltas.bias.copy_(torch.tensor([0.0, 0.0, 1.0, 1.0]))
        runs = {(c, b): model.mixed_inference(inputs, c, b) for c in HEADS for b in HEADS}
    for classes_from, label in [("s_head", 1), ("t_head", 0)]:
        for boxes_from in HEADS:
            got = runs[classes_from, boxes_from]
            assert all((o["instances"].pred_classes == label).all() for o in got)
            assert _box_rows(got) == _box_rows(runs[boxes_from, boxes_from])
    s_boxes, t_boxes = _box_rows(runs["s_head", "s_head"]), _box_rows(runs["t_head", "t_head"])
    assert all(len(s) > 0 for s in s_boxes) and s_boxes != t_boxes
    with pytest.raises(ValueError, match="name one of"):
        model.mixed_inference(inputs, "t_head", "refinement")


def test_teacher_inference_without_a_t_head_is_a_clear_error(cfg, make_inputs):
    cfg.MODEL.MIMICDET.MIMIC.ENABLED = False
    cfg.MODEL.MIMICDET.T_HEAD.ENABLED = False
    model = build_model(cfg).eval()
    with pytest.raises(RuntimeError, match="T_HEAD.ENABLED"):
        model.teacher_inference(make_inputs())


def test_mimic_loss_reads_the_s_head_at_each_sampled_boxs_anchor_location(cfg, make_inputs):
    """
    The student vectors of the mimic loss are the S-head's own outputs at the anchor location
    (level, row, column) that produced each box, for refined boxes only (no appended GT) and at
    most MIMIC.NUM_PER_IMAGE per image.
    """
    cfg.MODEL.MIMICDET.MIMIC.NUM_PER_IMAGE = 5
    torch.manual_seed(0)
    model = build_model(cfg)
    s_head_outputs = []
    model.s_head.register_forward_hook(lambda m, i, o: s_head_outputs.append(o))
    received = []
    model.mimic_loss.register_forward_hook(lambda m, args, o: received.append(args))
    _train_losses(model, make_inputs(num_images=2))

    ((boxes, student_cls, student_reg),) = received
    level_logits, _, level_reg = s_head_outputs[0]
    sizes = [x.shape[2] * x.shape[3] for x in level_logits]
    starts = torch.tensor([0] + sizes).cumsum(0)
    checked = 0
    for n, inst in enumerate(boxes):
        assert 0 < len(inst) <= 5
        assert (inst.anchor_index >= 0).all(), "appended GT boxes have no anchor location"
        for idx, level in zip(inst.anchor_index.tolist(), inst.levels.tolist()):
            k = model.head_in_features.index(f"p{level}")
            assert starts[k] <= idx < starts[k + 1]
            width = level_logits[k].shape[3]
            row, col = divmod(idx - int(starts[k]), width)
            torch.testing.assert_close(student_cls[n, idx], level_logits[k][n, :, row, col])
            torch.testing.assert_close(student_reg[n, idx], level_reg[k][n, :, row, col])
            checked += 1
    assert checked > 0


def test_training_step_under_bfloat16_autocast_has_finite_losses_and_gradients(cfg, make_inputs):
    """AMP as detectron2's AMPTrainer runs it (forward under autocast, backward outside), on the
    CPU with bfloat16; the S-head's deformable convs get half-precision inputs there."""
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    with EventStorage():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model(make_inputs())
        assert set(losses) == ALL_LOSSES
        for name, value in losses.items():
            assert value.dtype == torch.float32 and torch.isfinite(value), (name, value)
        sum(losses.values()).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    for name, conv in model.s_head.deform_convs.items():
        assert conv.weight.grad.abs().sum() > 0, name


@pytest.mark.parametrize("box_aligned", [False, True])
def test_inference_reads_the_s_head_at_the_top_refined_boxes_as_the_dense_head_would(
    cfg, make_inputs, box_aligned
):
    """Inference evaluates the S-head at the refined boxes' locations only; the detections
    must be those of the dense S-head indexed at the same locations."""
    cfg.MODEL.MIMICDET.S_HEAD.BOX_ALIGNED_OFFSETS = box_aligned
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    # trained-looking offsets, so that the deformable conv samples off the grid
    for net in model.s_head.offset_nets.values():
        torch.nn.init.normal_(net[-1].weight, std=0.5)
    inputs = make_inputs(num_images=2)
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        results = model.forward_inference(images, features)
        anchors, levels, objectness, deltas, s_logits, s_deltas, _ = model._dense_forward(features)
        refined = model.refinement.refined_boxes(
            anchors, levels, objectness, deltas, images.image_sizes
        )
        expected = [
            model.inference_single_image(r, logits[r.anchor_index], box_deltas[r.anchor_index])
            for r, logits, box_deltas in zip(refined, s_logits, s_deltas)
        ]
    assert {int(lvl) for r in refined for lvl in r.levels.unique()} == {3, 4, 5, 6, 7}
    for result, reference in zip(results, expected):
        assert len(reference) > 0
        torch.testing.assert_close(result.scores, reference.scores, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(
            result.pred_boxes.tensor, reference.pred_boxes.tensor, rtol=1e-4, atol=1e-3
        )
        assert torch.equal(result.pred_classes, reference.pred_classes)
