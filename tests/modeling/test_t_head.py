"""T-head: pools each box from its own level (k - 1 when staggered), two paths, losses."""

import math

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_roi_heads
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from mimicdet.modeling import MimicTHead

SIZE = 128
SHAPES = {f"p{lvl}": ShapeSpec(channels=32, stride=2**lvl) for lvl in range(2, 8)}


def _features():
    # every level is filled with its own level number, so a pooled value names its level
    return {
        name: torch.full((1, 32, SIZE // s.stride, SIZE // s.stride), float(name[1:]))
        for name, s in SHAPES.items()
    }


def _proposals(levels):
    inst = Instances((SIZE, SIZE))
    boxes = torch.tensor([[8.0, 8, 40, 40], [50, 50, 90, 100], [0, 0, 120, 120]])[: len(levels)]
    inst.proposal_boxes = Boxes(boxes)
    inst.objectness_logits = torch.zeros(len(levels))
    inst.levels = torch.tensor(levels)
    inst.anchor_index = torch.arange(len(levels))
    return inst


def _gt():
    gt = Instances((SIZE, SIZE), gt_boxes=Boxes(torch.tensor([[8.0, 8, 72, 72]])))
    gt.gt_classes = torch.tensor([0])
    return gt


@pytest.mark.parametrize("staggered", [True, False])
def test_pool_reads_each_box_from_its_given_level(cfg, staggered):
    cfg.MODEL.MIMICDET.STAGGERED = staggered
    head = build_roi_heads(cfg, SHAPES)
    assert isinstance(head, MimicTHead)
    assert head.pool_levels == ([2, 3, 4, 5, 6] if staggered else [3, 4, 5, 6, 7])
    feats = _features()
    levels = torch.tensor(head.pool_levels[::-1][:3])
    pooled = head.pool(
        [feats[f"p{lvl}"] for lvl in head.pool_levels],
        [_proposals([0, 0, 0]).proposal_boxes],
        levels,
    )
    assert pooled.shape == (3, 32, 7, 7)
    torch.testing.assert_close(pooled.mean(dim=(1, 2, 3)), levels.float())


@pytest.mark.parametrize("staggered", [True, False])
def test_forward_pools_from_level_below_when_staggered(cfg, staggered):
    cfg.MODEL.MIMICDET.STAGGERED = staggered
    cfg.MODEL.ROI_HEADS.PROPOSAL_APPEND_GT = False
    head = build_roi_heads(cfg, SHAPES).train()
    boxes_per_level = {}
    for lvl, pooler in zip(head.pool_levels, head.pooler.level_poolers):
        pooler.register_forward_hook(
            lambda m, i, o, lvl=lvl: boxes_per_level.__setitem__(lvl, len(i[1]))
        )
    with EventStorage():
        sampled, losses = head(None, _features(), [_proposals([5, 5, 4])], [_gt()])
    used = {lvl for lvl, n in boxes_per_level.items() if n > 0}
    assert used == ({4, 3} if staggered else {5, 4})

    assert set(losses) == {"loss_t_cls", "loss_t_box"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert sampled[0].teacher_cls_logits.shape == (len(sampled[0]), 3)
    assert sampled[0].teacher_reg_feats.shape == (len(sampled[0]), 64)


def test_predict_decodes_with_the_t_heads_own_box_weights(cfg):
    # the S-head keeps (10, 10, 5, 5): decoded with those, the deltas below would grow each box
    # 2 ** (2 / 5) times, not 4 times
    cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
    head = build_roi_heads(cfg, SHAPES).eval()
    logits = torch.tensor([2.0, 0.0, -1.0])  # two classes, then background
    with torch.no_grad():
        for layer, bias in [
            (head.box_predictor.bbox_pred, [0.0, 0.0, math.log(2), math.log(2)]),
            (head.box_predictor.cls_score, logits),
        ]:  # fmt: skip
            layer.weight.zero_()
            layer.bias.copy_(torch.as_tensor(bias))
    proposals = _proposals([4, 4, 5])
    ((boxes, probs),) = head.predict(_features(), [proposals])
    given, got = proposals.proposal_boxes, Boxes(boxes)
    torch.testing.assert_close(got.area(), 4 * given.area())
    torch.testing.assert_close(got.get_centers(), given.get_centers())
    torch.testing.assert_close(probs, logits.softmax(0)[:2].expand(3, 2))


def test_appended_gt_gets_the_refinements_level_and_no_anchor(cfg):
    head = build_roi_heads(cfg, SHAPES).train()
    with EventStorage():
        sampled, _ = head(None, _features(), [_proposals([6])], [_gt()])
    gt_rows = sampled[0][sampled[0].anchor_index < 0]
    # sqrt(area) 64 against the anchors 32 (P3), 64 (P4): dense level 4; staggered pooling then
    # reads P3
    assert len(gt_rows) == 1 and gt_rows.levels.tolist() == [4]
    cfg.MODEL.MIMICDET.REFINE.LEVEL_ASSIGNMENT = "canonical"
    head = build_roi_heads(cfg, SHAPES).train()
    with EventStorage():
        sampled, _ = head(None, _features(), [_proposals([6])], [_gt()])
    # floor(4 + log2(64 / 224)) = 2, clamped to P3
    assert sampled[0][sampled[0].anchor_index < 0].levels.tolist() == [3]


def _position_features(channels=32):
    """Per level, channel 0 holds each cell's centre x in image pixels, channel 1 its y."""
    feats = {}
    for name, s in SHAPES.items():
        n = SIZE // s.stride
        centres = (torch.arange(n, dtype=torch.float32) + 0.5) * s.stride
        x = torch.zeros(1, channels, n, n)
        x[0, 0] = centres[None, :].expand(n, n)
        x[0, 1] = centres[:, None].expand(n, n)
        feats[name] = x
    return feats


@pytest.mark.parametrize("staggered", [True, False])
def test_pooling_reads_the_box_in_image_coordinates(cfg, staggered):
    """Each 7x7 bin of a pooled box holds the image position of the bin's centre."""
    cfg.MODEL.MIMICDET.STAGGERED = staggered
    head = build_roi_heads(cfg, SHAPES)
    feats = _position_features()
    # well inside the image, so no bin reads the clamped border
    box = torch.tensor([[40.0, 36.0, 88.0, 92.0]])
    for level in head.pool_levels[:3]:
        pooled = head.pool(
            [feats[f"p{lvl}"] for lvl in head.pool_levels],
            [Boxes(box)],
            torch.tensor([level]),
        )
        bins = (torch.arange(7, dtype=torch.float32) + 0.5) / 7
        xs, ys = 40.0 + 48.0 * bins, 36.0 + 56.0 * bins
        torch.testing.assert_close(pooled[0, 0], xs[None].expand(7, 7), atol=1e-3, rtol=0)
        torch.testing.assert_close(pooled[0, 1], ys[:, None].expand(7, 7), atol=1e-3, rtol=0)


def test_a_box_on_a_level_without_features_is_an_error(cfg):
    cfg.MODEL.MIMICDET.STAGGERED = False
    head = build_roi_heads(cfg, SHAPES)
    feats = _features()
    with pytest.raises(ValueError, match=r"levels \[2\] cannot be pooled"):
        head.pool(
            [feats[f"p{lvl}"] for lvl in head.pool_levels],
            [_proposals([0, 0]).proposal_boxes],
            torch.tensor([2, 3]),
        )


def test_two_paths_are_detectron2_conv_fc_heads(cfg):
    head = build_roi_heads(cfg, SHAPES)
    assert isinstance(head.cls_head, FastRCNNConvFCHead)
    assert isinstance(head.reg_head, FastRCNNConvFCHead)
    assert [fc.out_features for fc in head.cls_head.fcs] == [64, 64]
    assert len(head.cls_head.conv_norm_relus) == 0
    assert [c.kernel_size for c in head.reg_head.conv_norm_relus] == [(3, 3)] * 4
    assert [fc.out_features for fc in head.reg_head.fcs] == [64]
    assert head.box_predictor.cls_score.out_features == 3
    assert head.box_predictor.bbox_pred.out_features == 4
    with pytest.raises(AssertionError):
        head.eval()(None, _features(), [_proposals([5])], [_gt()])


def test_checkpoints_with_the_old_tower_names_load(cfg):
    """Before the FastRCNNConvFCHead towers the T-head named them cls_fcs, reg_convs, reg_fc."""
    head = build_roi_heads(cfg, SHAPES)
    renames = {
        "cls_head.fc1.": "cls_fcs.0.",
        "cls_head.fc2.": "cls_fcs.1.",
        "reg_head.fc1.": "reg_fc.",
    }
    renames.update({f"reg_head.conv{k + 1}.": f"reg_convs.{k}." for k in range(4)})
    old = {}
    for key, value in head.state_dict().items():
        for new, before in renames.items():
            key = key.replace(new, before)
        old[key] = torch.randn_like(value)
    assert not any(k.startswith(("cls_head", "reg_head")) for k in old)
    result = head.load_state_dict(old)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(head.reg_head.conv3.weight, old["reg_convs.2.weight"])
    torch.testing.assert_close(head.cls_head.fc2.bias, old["cls_fcs.1.bias"])
    torch.testing.assert_close(head.reg_head.fc1.weight, old["reg_fc.weight"])
