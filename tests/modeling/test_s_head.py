"""S-head: per-level shapes, guided deformable convs, labels and hard negative mining."""

import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from mimicdet.modeling import SHead
from mimicdet.modeling.s_head import box_aligned_offsets, hard_mining_samples

SHAPES = [ShapeSpec(channels=32, stride=s) for s in [8, 16, 32, 64, 128]]


def test_shapes_and_kernel_sizes_per_level(cfg):
    head = SHead(cfg, SHAPES)
    assert sorted(head.deform_convs) == ["k3", "k5"]
    assert head.deform_convs["k3"].weight.shape[-2:] == (3, 3)
    assert head.deform_convs["k5"].weight.shape[-2:] == (5, 5)
    assert head.offset_nets["k5"][-1].out_channels == 2 * 5 * 5
    assert [m.out_channels for m in head.offset_nets["k3"] if hasattr(m, "out_channels")] == [
        8,
        16,
        18,
    ]

    sizes = [16, 8, 4, 2, 1]
    feats = [torch.randn(2, 32, s, s + 1) for s in sizes]
    guidance = [torch.randn(2, 4, s, s + 1) for s in sizes]
    called = []
    for k, conv in head.deform_convs.items():
        conv.register_forward_hook(lambda m, i, o, k=k: called.append(k))
    logits, deltas, reg_feats = head(feats, guidance)
    assert called == ["k3", "k5", "k5", "k5", "k5"]
    for s, lg, dl, rf in zip(sizes, logits, deltas, reg_feats):
        assert lg.shape == (2, 3, s, s + 1)
        assert dl.shape == (2, 4, s, s + 1)
        assert rf.shape == (2, 64, s, s + 1)


def test_zero_offsets_at_init_make_a_plain_conv(cfg):
    head = SHead(cfg, SHAPES)
    x, g = torch.randn(1, 32, 9, 9), torch.randn(1, 4, 9, 9)
    offset = head.offset_nets["k5"](g)
    assert offset.abs().max() == 0
    conv = head.deform_convs["k5"]
    torch.testing.assert_close(
        conv(x, offset), F.conv2d(x, conv.weight, conv.bias, padding=2), atol=1e-5, rtol=1e-5
    )


def test_guidance_detached_or_not(cfg):
    for detach in (True, False):
        cfg.MODEL.MIMICDET.S_HEAD.DETACH_GUIDANCE = detach
        head = SHead(cfg, SHAPES[:1] * 5)
        # non-zero last layer so that offsets depend on the guidance
        torch.nn.init.normal_(head.offset_nets["k3"][-1].weight, std=0.1)
        g = torch.randn(1, 4, 6, 6, requires_grad=True)
        logits, _, _ = head([torch.randn(1, 32, 6, 6)] * 5, [g] * 5)
        logits[0].sum().backward()
        assert (g.grad is None) == detach


def _losses(head, *args):
    """SHead.losses inside an event storage; returns the losses and the logged sample counts."""
    with EventStorage() as storage:
        losses = head.losses(*args)
        counts = {k: v.latest() for k, v in storage.histories().items()}
    return losses, counts


def test_positives_first_keeps_all_positives_and_the_hardest_negatives(cfg):
    cfg.MODEL.MIMICDET.S_HEAD.HARD_MINING = "positives_first"
    cfg.MODEL.MIMICDET.S_HEAD.BATCH_SIZE_PER_IMAGE = 3
    cfg.MODEL.MIMICDET.S_HEAD.NEG_POS_RATIO = 0.0
    head = SHead(cfg, SHAPES)
    gt = Instances((64, 64), gt_boxes=Boxes(torch.tensor([[10.0, 10, 40, 40]])))
    gt.gt_classes = torch.tensor([1])
    refined = Instances((64, 64))
    # IoU with GT: 1.0 (positive), then three negatives
    refined.proposal_boxes = Boxes(
        torch.tensor([[10.0, 10, 40, 40], [40, 40, 60, 60], [0, 0, 8, 8], [45, 0, 60, 10]])
    )
    refined.anchor_index = torch.tensor([5, 0, 2, 7])
    logits = torch.zeros(1, 8, 3)
    logits[0, 0] = torch.tensor([5.0, 0, 0])  # hardest negative
    logits[0, 7] = torch.tensor([2.0, 0, 0])  # second hardest
    deltas = torch.zeros(1, 8, 4)
    deltas[0, 5] = torch.tensor([0.5, -0.5, 0.0, 1.0])
    losses, counts = _losses(head, [refined], logits, deltas, [gt])

    ce = F.cross_entropy(logits[0, [5, 0, 7, 2]], torch.tensor([1, 2, 2, 2]), reduction="none")
    torch.testing.assert_close(losses["loss_s_cls"], ce[:3].sum() / 3)
    torch.testing.assert_close(losses["loss_s_box"], torch.tensor(2.0 / 3))
    assert counts == {"s_head/num_fg_samples": 1.0, "s_head/num_bg_samples": 2.0}

    empty = Instances((64, 64), gt_boxes=Boxes(torch.zeros(0, 4)))
    empty.gt_classes = torch.zeros(0, dtype=torch.int64)
    losses, _ = _losses(head, [refined], logits, deltas, [empty])
    assert losses["loss_s_box"].item() == 0 and torch.isfinite(losses["loss_s_cls"])


def _crowded_image(num_pos=200, num_neg=1000, num_hard_neg=50):
    """
    One image whose refined boxes are ``num_pos`` copies of its GT box (IoU 1) and ``num_neg``
    boxes far from it; the S-head's logits make ``num_hard_neg`` negatives confidently wrong
    (the highest losses), the positives unsure, the other negatives right.
    """
    gt = Instances((256, 256), gt_boxes=Boxes(torch.tensor([[10.0, 10, 60, 60]])))
    gt.gt_classes = torch.tensor([0])
    refined = Instances((256, 256))
    far = torch.tensor([[150.0, 150, 200, 200]])
    refined.proposal_boxes = Boxes(
        torch.cat([gt.gt_boxes.tensor.expand(num_pos, 4), far.expand(num_neg, 4)])
    )
    refined.anchor_index = torch.randperm(num_pos + num_neg)
    logits = torch.zeros(1, num_pos + num_neg, 3)
    neg = refined.anchor_index[num_pos:]
    logits[0, neg, 2] = 4.0  # background, right
    logits[0, neg[:num_hard_neg], 0] = 8.0  # foreground class 0, wrong
    logits[0, refined.anchor_index[:num_pos], 0] = torch.linspace(-1, 1, num_pos)
    return gt, refined, logits, torch.zeros(1, num_pos + num_neg, 4)


def _cross_entropy(refined, logits, num_pos):
    labels = torch.tensor([0] * num_pos + [2] * (len(refined) - num_pos))
    return F.cross_entropy(logits[0, refined.anchor_index], labels, reduction="none")


def test_top_loss_mining_takes_the_highest_losses_of_a_crowded_image(cfg):
    assert cfg.MODEL.MIMICDET.S_HEAD.HARD_MINING == "top_loss"  # the paper's, the default
    head = SHead(cfg, SHAPES)
    gt, refined, logits, deltas = _crowded_image()
    losses, counts = _losses(head, [refined], logits, deltas, [gt])
    ce = _cross_entropy(refined, logits, 200)
    torch.testing.assert_close(losses["loss_s_cls"], ce.topk(128).values.sum() / 128)
    # the 50 wrong negatives, then the 78 least confident positives
    assert counts == {"s_head/num_fg_samples": 78.0, "s_head/num_bg_samples": 50.0}


def test_positives_first_mining_keeps_three_negatives_per_positive(cfg):
    cfg.MODEL.MIMICDET.S_HEAD.HARD_MINING = "positives_first"
    assert cfg.MODEL.MIMICDET.S_HEAD.NEG_POS_RATIO == 3.0
    head = SHead(cfg, SHAPES)
    gt, refined, logits, deltas = _crowded_image()
    losses, counts = _losses(head, [refined], logits, deltas, [gt])
    ce = _cross_entropy(refined, logits, 200)
    expected = ce[:200].sum() + ce[200:].topk(600).values.sum()
    torch.testing.assert_close(losses["loss_s_cls"], expected / 800)
    assert counts == {"s_head/num_fg_samples": 200.0, "s_head/num_bg_samples": 600.0}


def test_hard_mining_samples_rules():
    losses = torch.tensor([0.1, 5.0, 0.3, 4.0, 0.2, 3.0])
    is_fg = torch.tensor([True, False, True, False, False, False])
    top = hard_mining_samples(losses, is_fg, 3, "top_loss", 3.0)
    assert sorted(top.tolist()) == [1, 3, 5]
    # 2 positives, then max(3 - 2, 3 x 2) = 6 negatives wanted, 4 available
    kept = hard_mining_samples(losses, is_fg, 3, "positives_first", 3.0)
    assert sorted(kept.tolist()) == [0, 1, 2, 3, 4, 5]
    kept = hard_mining_samples(losses, is_fg, 3, "positives_first", 0.0)
    assert sorted(kept.tolist()) == [0, 1, 2]
    assert len(hard_mining_samples(losses, is_fg, 100, "top_loss", 3.0)) == 6


def test_unknown_hard_mining_rule_is_refused(cfg):
    cfg.MODEL.MIMICDET.S_HEAD.HARD_MINING = "top-loss"
    with pytest.raises(ValueError, match="hard mining 'top-loss'"):
        SHead(cfg, SHAPES)


def test_giou_box_loss_scores_the_decoded_boxes(cfg):
    cfg.MODEL.MIMICDET.S_HEAD.BATCH_SIZE_PER_IMAGE = 2
    cfg.MODEL.MIMICDET.S_HEAD.BBOX_REG_LOSS_TYPE = "giou"
    head = SHead(cfg, SHAPES)
    gt = Instances((64, 64), gt_boxes=Boxes(torch.tensor([[10.0, 10, 40, 40]])))
    gt.gt_classes = torch.tensor([0])
    refined = Instances((64, 64))
    # IoU with the GT 0.81 (positive) and 0 (negative)
    refined.proposal_boxes = Boxes(torch.tensor([[10.0, 10, 37, 37], [45, 45, 60, 60]]))
    refined.anchor_index = torch.tensor([1, 0])
    logits = torch.zeros(1, 2, 3)
    deltas = torch.zeros(1, 2, 4)
    deltas[0, 0] = torch.tensor([3.0, 3, 3, 3])  # the negative's deltas must not count
    losses, _ = _losses(head, [refined], logits, deltas, [gt])
    # zero deltas keep the refined box: GIoU loss 1 - 729/900, over 2 samples
    torch.testing.assert_close(losses["loss_s_box"], torch.tensor((1 - 729 / 900) / 2))

    deltas[0, 1] = head.box2box_transform.get_deltas(
        refined.proposal_boxes.tensor[:1], gt.gt_boxes.tensor
    )[0]
    losses, _ = _losses(head, [refined], logits, deltas, [gt])
    assert losses["loss_s_box"].abs().item() < 1e-5


def _pixel_coordinates(size, stride):
    """``(1, 2, size, size)``: each cell holds the (x, y) pixel position of its centre."""
    centers = (torch.arange(size, dtype=torch.float64) + 0.5) * stride
    return torch.stack([centers[None].expand(size, size), centers[:, None].expand(size, size)])[
        None
    ]


def test_box_aligned_offsets_put_the_taps_on_the_refined_box():
    from mimicdet.layers import deform_conv2d

    stride, size, anchor_size, weights = 8, 12, 4.0, (1.0, 2.0, 1.0, 0.5)
    deltas = torch.zeros(1, 4, size, size, dtype=torch.float64)
    deltas[0, :, 6, 5] = torch.tensor([0.1, -0.4, -0.5, 0.15])
    for k in (3, 5):
        offsets = box_aligned_offsets(deltas, k, anchor_size, 0.5, weights)
        assert offsets.shape == (1, 2 * k * k, size, size)
        # the refined box of the anchor at row 6, column 5 (side 32 px, centre (44, 52))
        side = anchor_size * stride
        cx, cy = 44 + 0.1 * side, 52 - 0.4 / 2.0 * side
        w, h = side * math.exp(-0.5), side * math.exp(0.15 / 0.5)
        for tap in range(k * k):
            # a kernel that reads tap `tap` only returns the pixel position that tap samples
            weight = torch.zeros(2, 2, k, k, dtype=torch.float64)
            weight[0, 0].view(-1)[tap] = weight[1, 1].view(-1)[tap] = 1
            x, y = deform_conv2d(_pixel_coordinates(size, stride), offsets, weight, padding=k // 2)[
                0, :, 6, 5
            ].tolist()
            row, col = divmod(tap, k)
            assert x == pytest.approx(cx - w / 2 + (col + 0.5) * w / k)
            assert y == pytest.approx(cy - h / 2 + (row + 0.5) * h / k)
        # zero deltas: the taps spread evenly over the anchor itself
        still = box_aligned_offsets(torch.zeros(1, 4, 2, 2), k, anchor_size, 0.5, weights)
        spacing = anchor_size / k - 1
        assert still[0, 1::2, 0, 0].view(k, k)[0].tolist() == pytest.approx(
            [(j - k // 2) * spacing for j in range(k)]
        )


def test_box_aligned_head_starts_on_the_refined_box(cfg):
    cfg.MODEL.MIMICDET.S_HEAD.BOX_ALIGNED_OFFSETS = True
    cfg.MODEL.MIMICDET.REFINE.ANCHOR_SIZE_PER_STRIDE = 6.0
    head = SHead(cfg, SHAPES[:1] * 5)
    x, g = torch.randn(1, 32, 7, 7), torch.randn(1, 4, 7, 7) * 0.3
    conv = head.deform_convs["k3"]
    expected = F.relu(conv(x, box_aligned_offsets(g, 3, 6.0, 0.5, (1.0, 1.0, 1.0, 1.0))))
    logits, _, _ = head([x] * 5, [g] * 5)
    torch.testing.assert_close(
        logits[0], head.cls_score(F.relu(head.cls_fc(expected))), atol=1e-5, rtol=1e-5
    )
    # the paper's head (the key off) starts as a plain conv that ignores the guidance
    cfg.MODEL.MIMICDET.S_HEAD.BOX_ALIGNED_OFFSETS = False
    assert SHead(cfg, SHAPES).box_aligned_guidance is None
