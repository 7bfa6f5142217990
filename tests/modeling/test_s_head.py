"""S-head: per-level shapes, guided deformable convs, labels and hard negative mining."""

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, Instances

from mimicdet.modeling import SHead

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


def test_losses_keep_all_positives_and_the_hardest_negatives(cfg):
    cfg.MODEL.MIMICDET.S_HEAD.BATCH_SIZE_PER_IMAGE = 3
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
    losses = head.losses([refined], logits, deltas, [gt])

    ce = F.cross_entropy(logits[0, [5, 0, 7, 2]], torch.tensor([1, 2, 2, 2]), reduction="none")
    torch.testing.assert_close(losses["loss_s_cls"], ce[:3].sum() / 3)
    torch.testing.assert_close(losses["loss_s_box"], torch.tensor(2.0 / 3))

    empty = Instances((64, 64), gt_boxes=Boxes(torch.zeros(0, 4)))
    empty.gt_classes = torch.zeros(0, dtype=torch.int64)
    losses = head.losses([refined], logits, deltas, [empty])
    assert losses["loss_s_box"].item() == 0 and torch.isfinite(losses["loss_s_cls"])
