"""mimicdet.distill masks on hand-made examples: which cells FGFI and DeFeat imitate."""

import torch
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator

from mimicdet.distill import defeat_foreground_masks, fgfi_masks


def _anchors():
    """One square anchor per cell: 8 px on a 4x4 grid (stride 8), 16 px on a 2x2 (stride 16)."""
    generator = DefaultAnchorGenerator(
        sizes=[[8], [16]], aspect_ratios=[[1.0]], strides=[8, 16], offset=0.5
    )
    features = [torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2)]
    return [boxes.tensor for boxes in generator(features)], [(4, 4), (2, 2)]


# GT 0 is exactly the stride-8 anchor of cell (0, 0) (IoU 1). GT 1 covers the stride-8 anchors of
# cells (2, 1) and (2, 2) by half each (IoU 0.5 with both, 0 with the rest). On the stride-16
# level GT 0 has IoU 0.25 with cell (0, 0), GT 1 IoU 0.2 with cells (1, 0) and (1, 1).
GT = torch.tensor([[0.0, 0.0, 8.0, 8.0], [8.0, 16.0, 24.0, 24.0]])


def test_fgfi_mask_of_two_gts_by_hand():
    anchors, grids = _anchors()
    fine, coarse = fgfi_masks(anchors, grids, GT, psi=0.5)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, 0] = expected[2, 1] = expected[2, 2] = True
    assert torch.equal(fine, expected)
    # thresholds 0.5 and 0.25 from the GTs' best anchors overall: no coarse anchor reaches them
    assert not coarse.any()


def test_fgfi_per_level_thresholds_mark_every_level():
    anchors, grids = _anchors()
    fine, coarse = fgfi_masks(anchors, grids, GT, psi=0.5, per_level_threshold=True)
    assert fine.sum() == 3
    # thresholds 0.125 and 0.1 on the coarse level
    assert torch.equal(coarse, torch.tensor([[True, False], [True, True]]))


def test_fgfi_mask_is_empty_without_gts_or_overlap():
    anchors, grids = _anchors()
    for gt in (torch.zeros(0, 4), torch.tensor([[100.0, 100.0, 120.0, 120.0]])):
        assert not any(m.any() for m in fgfi_masks(anchors, grids, gt))


def test_defeat_mask_puts_each_gt_on_one_level_over_the_cells_it_covers():
    # with canonical size 32 at level 4: sqrt(16 * 8) = 11.3 -> level 2, clamped to 3;
    # sqrt(48 * 32) = 39.2 -> level 4
    gt = torch.tensor([[4.0, 4.0, 20.0, 12.0], [16.0, 0.0, 64.0, 32.0]])
    fine, coarse = defeat_foreground_masks(
        gt, [(8, 8), (4, 4)], [8, 16], canonical_box_size=32, canonical_level=4
    )
    expected_fine = torch.zeros(8, 8)
    expected_fine[0:2, 0:3] = 1  # rows floor(4/8)..ceil(12/8)-1, columns floor(4/8)..ceil(20/8)-1
    expected_coarse = torch.zeros(4, 4)
    expected_coarse[0:2, 1:4] = 1
    assert torch.equal(fine, expected_fine)
    assert torch.equal(coarse, expected_coarse)
