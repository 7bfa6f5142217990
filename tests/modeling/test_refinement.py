"""Refinement module: anchors, scale-and-centre labels, refined boxes."""

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from mimicdet.modeling import RefinementModule

STRIDES = [8, 16, 32, 64, 128]
SIZE = 256


def _module(cfg):
    return RefinementModule(cfg, [ShapeSpec(channels=32, stride=s) for s in STRIDES])


def _features(n=1):
    return [torch.zeros(n, 32, SIZE // s, SIZE // s) for s in STRIDES]


def _positive_cells(module, boxes):
    """Label one image with `boxes`; returns {(level, row, col): matched GT index}."""
    anchors, levels = module.anchors(_features())
    gt = Instances((SIZE, SIZE), gt_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)))
    labels, matched = module.label_anchors(anchors, levels, [gt])
    cells = {}
    for idx in (labels[0] == 1).nonzero().flatten().tolist():
        level = int(levels[idx])
        local = idx - int((levels < level).sum())
        width = SIZE // 2**level
        gt_idx = [tuple(b) for b in boxes].index(tuple(matched[0, idx].tolist()))
        cells[(level, local // width, local % width)] = gt_idx
    return cells


def test_one_square_anchor_per_location(cfg):
    anchors, levels = _module(cfg).anchors(_features())
    assert len(anchors) == sum((SIZE // s) ** 2 for s in STRIDES)
    w = anchors.tensor[:, 2] - anchors.tensor[:, 0]
    h = anchors.tensor[:, 3] - anchors.tensor[:, 1]
    torch.testing.assert_close(w, 4.0 * 2.0 ** levels.float())
    torch.testing.assert_close(h, w)
    # first anchor of P3 is centred in the first 8x8 cell
    torch.testing.assert_close(anchors.get_centers()[0], torch.tensor([4.0, 4.0]))


def test_box_lands_on_its_level_and_centre_cells(cfg):
    module = _module(cfg)
    # sqrt(area) 64 against anchors 32 (P3), 64 (P4): log2(64 / 32) = 1 -> P4; stride 16,
    # centres 16j + 8; shrunk box: 64 +- 0.3 * 64 / 2 = [54.4, 73.6] holds 56 and 72 (cells 3, 4)
    small = (32, 32, 96, 96)
    # sqrt(area) 240: log2(240 / 32) = 2.9 -> P6 (anchor 256); stride 64, centres 64j + 32;
    # 128 +- 36 holds 96 and 160 (cells 1, 2)
    large = (8, 8, 248, 248)
    cells = _positive_cells(module, [small, large])
    expected = {(4, r, c): 0 for r in (3, 4) for c in (3, 4)}
    expected.update({(6, r, c): 1 for r in (1, 2) for c in (1, 2)})
    assert cells == expected


def test_canonical_rule_is_detectron2s_roi_pooler_rule(cfg):
    cfg.MODEL.MIMICDET.REFINE.LEVEL_ASSIGNMENT = "canonical"
    module = _module(cfg)
    # sqrt(area) 64 -> floor(4 + log2(64 / 224)) = 2 -> clamped to P3; stride 8, centres 8i + 4;
    # shrunk box: 64 +- 0.3 * 64 / 2 = [54.4, 73.6] holds centres 60 and 68 (cells 7, 8)
    small = (32, 32, 96, 96)
    # sqrt(area) 240 -> P4; stride 16, centres 16j + 8; 128 +- 36 holds 104..152 (cells 6..9)
    large = (8, 8, 248, 248)
    cells = _positive_cells(module, [small, large])
    expected = {(3, r, c): 0 for r in (7, 8) for c in (7, 8)}
    expected.update({(4, r, c): 1 for r in range(6, 10) for c in range(6, 10)})
    assert cells == expected


def test_overlapping_claims_go_to_the_smallest_box(cfg):
    # the canonical rule puts both on P3; the larger one (64 +- 12) claims cells 6..9, the
    # smaller one cells 7..8
    cfg.MODEL.MIMICDET.REFINE.LEVEL_ASSIGNMENT = "canonical"
    cells = _positive_cells(_module(cfg), [(24, 24, 104, 104), (32, 32, 96, 96)])
    expected = {(3, r, c): 0 for r in range(6, 10) for c in range(6, 10)}
    expected.update({(3, r, c): 1 for r in (7, 8) for c in (7, 8)})
    assert cells == expected


def test_small_box_keeps_the_cell_holding_its_centre(cfg):
    box = (100, 100, 110, 110)  # shrunk to 3 px: no anchor centre inside without the floor
    assert _positive_cells(_module(cfg), [box]) == {(3, 13, 13): 0}
    cfg.MODEL.MIMICDET.REFINE.MIN_CENTER_RADIUS = 0.0
    assert _positive_cells(_module(cfg), [box]) == {}


def test_norm_key_puts_group_norm_after_the_conv(cfg):
    plain = _module(cfg)
    assert len(plain.convs) == 1
    assert plain.convs[0].norm is None and plain.convs[0].bias is not None
    cfg.MODEL.MIMICDET.REFINE.NORM = "GN"
    module = _module(cfg)
    assert isinstance(module.convs[0].norm, torch.nn.GroupNorm) and module.convs[0].bias is None
    # GroupNorm renormalises the small-init conv: its output, read before the ReLU, has unit
    # scale per group
    feats = [torch.randn(1, 32, SIZE // s, SIZE // s) for s in STRIDES]
    normed = module.convs[0].norm(
        torch.nn.functional.conv2d(feats[0], module.convs[0].weight, padding=1)
    )
    assert normed.std().item() == pytest.approx(1.0, rel=0.05)
    assert plain.convs(feats[0]).std().item() < 0.25


def test_num_convs_stacks_a_tower_before_the_predictors(cfg):
    cfg.MODEL.MIMICDET.REFINE.NUM_CONVS = 3
    cfg.MODEL.MIMICDET.REFINE.NORM = "GN"
    module = _module(cfg)
    assert [c.kernel_size for c in module.convs] == [(3, 3)] * 3
    assert all(isinstance(c.norm, torch.nn.GroupNorm) for c in module.convs)
    feats = [torch.randn(1, 32, SIZE // s, SIZE // s) for s in STRIDES]
    seen = []
    module.convs[2].register_forward_hook(lambda m, i, o: seen.append(o))
    logits, _ = module(feats)
    # the predictors read the third conv's (ReLU'd) output
    torch.testing.assert_close(logits[-1], module.objectness(seen[-1]))
    assert (seen[-1] >= 0).all()


def test_ignore_band_leaves_off_centre_cells_of_the_box_out_of_the_objectness_loss(cfg):
    cfg.MODEL.MIMICDET.REFINE.IGNORE_SAMPLING_RATIO = 1.0
    cfg.MODEL.MIMICDET.REFINE.LEVEL_ASSIGNMENT = "canonical"
    module = _module(cfg)
    anchors, levels = module.anchors(_features())
    # P3 (as in test_canonical_rule_is_detectron2s_roi_pooler_rule): positive cells 7..8; the
    # whole box [32, 96] holds centres 36..92, cells 4..11, of which the rest is ignored
    gt = Instances((SIZE, SIZE), gt_boxes=Boxes(torch.tensor([[32.0, 32, 96, 96]])))
    labels, matched = module.label_anchors(anchors, levels, [gt])
    p3 = labels[0, levels == 3].view(SIZE // 8, SIZE // 8)
    expected = torch.zeros_like(p3)
    expected[4:12, 4:12] = -1
    expected[7:9, 7:9] = 1
    assert torch.equal(p3, expected)
    assert (labels[0, levels != 3] == 0).all()

    # an ignored anchor's logit does not move the loss; a negative's and a positive's do
    logits, deltas = torch.zeros(1, len(anchors)), torch.zeros(1, len(anchors), 4)

    def loss_cls_with(index):
        moved = logits.clone()
        moved[0, index] = 5.0
        return module.losses(anchors, moved, deltas, labels, matched, 1.0)["loss_refine_cls"]

    base = loss_cls_with([])
    for label in (-1, 0, 1):
        index = (labels[0] == label).nonzero()[0]
        assert (loss_cls_with(index) == base) == (label == -1)


def test_objectness_loss_is_bce_by_default_and_focal_when_gamma_is_set(cfg):
    gt = Instances((SIZE, SIZE), gt_boxes=Boxes(torch.tensor([[32.0, 32, 96, 96]])))

    def loss_cls(module, logits):
        anchors, levels = module.anchors(_features())
        labels, matched = module.label_anchors(anchors, levels, [gt])
        deltas = torch.zeros(1, len(anchors), 4)
        loss = module.losses(anchors, logits, deltas, labels, matched, 1.0)["loss_refine_cls"]
        return loss, labels

    bce = _module(cfg)
    logits = torch.randn(1, sum(f.shape[2] * f.shape[3] for f in _features()))
    loss, labels = loss_cls(bce, logits)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, (labels == 1).float(), reduction="sum"
    )
    assert torch.allclose(loss, expected)

    cfg.MODEL.MIMICDET.REFINE.FOCAL_LOSS_ALPHA = 0.25
    cfg.MODEL.MIMICDET.REFINE.FOCAL_LOSS_GAMMA = 2.0
    focal = _module(cfg)
    # an easy negative (logit -6) costs BCE ~0.0025 but focal ~1e-8; a hard one (logit +3) keeps
    # most of its BCE: the focal loss spends the objectness gradient on the hard anchors
    negative = (labels[0] == 0).nonzero()[0]
    for logit, kept in ((-6.0, 1e-4), (3.0, 0.5)):
        moved = torch.full_like(logits, -20.0)
        moved[0, negative] = logit
        ref = torch.full_like(logits, -20.0)
        focal_cost = loss_cls(focal, moved)[0] - loss_cls(focal, ref)[0]
        bce_cost = loss_cls(bce, moved)[0] - loss_cls(bce, ref)[0]
        assert (focal_cost / bce_cost > kept) == (logit > 0)


def test_giou_box_loss_matches_fvcore_on_the_decoded_positives(cfg):
    from fvcore.nn import giou_loss

    cfg.MODEL.MIMICDET.REFINE.BBOX_REG_LOSS_TYPE = "giou"
    module = _module(cfg)
    anchors, levels = module.anchors(_features())
    gt = [Instances((SIZE, SIZE), gt_boxes=Boxes(torch.tensor([[32.0, 32, 96, 96]])))]
    labels, matched = module.label_anchors(anchors, levels, gt)
    logits = torch.zeros(1, len(anchors))
    deltas = torch.randn(1, len(anchors), 4) * 0.2
    losses = module.losses(anchors, logits, deltas, labels, matched, normalizer=2.0)

    pos = labels[0] == 1
    decoded = module.box2box_transform.apply_deltas(deltas[0][pos], anchors.tensor[pos])
    expected = giou_loss(decoded, matched[0][pos], reduction="sum") / 2.0
    torch.testing.assert_close(losses["loss_refine_box"], expected)
    # exact deltas cost nothing
    exact = module.box2box_transform.get_deltas(anchors.tensor, matched[0])[None]
    losses = module.losses(anchors, logits, exact, labels, matched, normalizer=2.0)
    assert losses["loss_refine_box"].abs().item() < 1e-5


def test_losses_and_refined_boxes(cfg):
    cfg.MODEL.MIMICDET.REFINE.PRE_NMS_TOPK_TRAIN = 50
    cfg.MODEL.MIMICDET.REFINE.POST_NMS_TOPK_TRAIN = 30
    cfg.MODEL.MIMICDET.REFINE.TOPK_TEST = 40
    module = _module(cfg)
    feats = [torch.randn_like(f) for f in _features(2)]
    anchors, levels = module.anchors(feats)
    logits, deltas = module(feats)
    assert [x.shape[1] for x in logits] == [1] * 5 and [x.shape[1] for x in deltas] == [4] * 5
    logits = torch.cat([x.flatten(1) for x in logits], dim=1)
    deltas = torch.cat([x.permute(0, 2, 3, 1).reshape(2, -1, 4) for x in deltas], dim=1)

    gt = [Instances((SIZE, SIZE), gt_boxes=Boxes(torch.tensor([[32.0, 32, 96, 96]])))] * 2
    labels, matched = module.label_anchors(anchors, levels, gt)
    losses = module.losses(anchors, logits, deltas, labels, matched, normalizer=8.0)
    assert set(losses) == {"loss_refine_cls", "loss_refine_box"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())

    with EventStorage():
        refined = module.refined_boxes(anchors, levels, logits, deltas, [(SIZE, SIZE)] * 2)
    for inst, lg, dl in zip(refined, logits, deltas):
        assert 0 < len(inst) <= 30
        assert (inst.levels == levels[inst.anchor_index]).all()
        torch.testing.assert_close(inst.objectness_logits, lg[inst.anchor_index])
        expected = module.box2box_transform.apply_deltas(
            dl[inst.anchor_index], anchors.tensor[inst.anchor_index]
        ).clamp(0, SIZE)
        torch.testing.assert_close(inst.proposal_boxes.tensor, expected)
        assert not inst.proposal_boxes.tensor.requires_grad

    module.eval()
    refined = module.refined_boxes(anchors, levels, logits, deltas, [(SIZE, SIZE)] * 2)
    top = logits[0].topk(40).indices
    assert set(refined[0].anchor_index.tolist()) <= set(top.tolist())


def test_checkpoints_from_before_the_conv_tower_still_load(cfg):
    # before REFINE.NUM_CONVS the single conv was `conv`; it is now `convs.0`
    module = _module(cfg)
    old = {k.replace("convs.0.", "conv."): v.clone() + 1 for k, v in module.state_dict().items()}
    assert "conv.weight" in old
    incompatible = module.load_state_dict(old, strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    torch.testing.assert_close(module.convs[0].weight, old["conv.weight"])


def test_training_keeps_the_top_candidates_of_every_level_before_the_nms(cfg):
    """PRE_NMS_TOPK_TRAIN caps each level: P7's best boxes survive even if P3 scores higher."""
    cfg.MODEL.MIMICDET.REFINE.PRE_NMS_TOPK_TRAIN = 2
    cfg.MODEL.MIMICDET.REFINE.NMS_THRESH_TRAIN = 1.0  # keep every candidate through the NMS
    module = _module(cfg).train()
    anchors, levels = module.anchors(_features())
    # objectness falls with the level: a cap over all levels would keep two P3 boxes only
    logits = (10.0 - levels.float() + torch.rand(len(levels)) * 0.1)[None]
    deltas = torch.zeros(1, len(anchors), 4)
    refined = module.refined_boxes(anchors, levels, logits, deltas, [(SIZE, SIZE)])[0]
    assert sorted(refined.levels.tolist()) == [3, 3, 4, 4, 5, 5, 6, 6, 7, 7]
    for level in range(3, 8):
        on_level = (levels == level).nonzero()[:, 0]
        best = on_level[logits[0, on_level].topk(min(2, len(on_level))).indices]
        assert set(refined.anchor_index[refined.levels == level].tolist()) == set(best.tolist())
