"""T-head: pools each box from its own level (k - 1 when staggered), two paths, losses."""

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_roi_heads
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


def test_appended_gt_gets_canonical_level_and_no_anchor(cfg):
    head = build_roi_heads(cfg, SHAPES).train()
    with EventStorage():
        sampled, _ = head(None, _features(), [_proposals([6])], [_gt()])
    gt_rows = sampled[0][sampled[0].anchor_index < 0]
    # sqrt(area) 64 -> dense level 3 by the canonical rule; staggered pooling then uses P2
    assert len(gt_rows) == 1 and gt_rows.levels.tolist() == [3]


def test_two_paths_structure(cfg):
    head = build_roi_heads(cfg, SHAPES)
    assert [fc.out_features for fc in head.cls_fcs] == [64, 64]
    assert len(head.reg_convs) == 4 and head.reg_fc.out_features == 64
    assert head.box_predictor.cls_score.out_features == 3
    assert head.box_predictor.bbox_pred.out_features == 4
    with pytest.raises(AssertionError):
        head.eval()(None, _features(), [_proposals([5])], [_gt()])
