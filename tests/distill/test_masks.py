"""mimicdet.distill masks on hand-made examples: which cells FGFI and DeFeat imitate."""

import torch
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator

from mimicdet.distill import defeat_foreground_masks, fgfi_masks, gt_levels


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


def test_gt_levels_put_boxes_under_112_px_on_the_finest_level_and_double_from_there():
    sizes = torch.tensor([8.0, 111.0, 113.0, 223.0, 225.0, 500.0, 1000.0, 5000.0])
    boxes = torch.stack([torch.zeros_like(sizes), torch.zeros_like(sizes), sizes, sizes], dim=1)
    assert gt_levels(boxes, 5).tolist() == [0, 0, 1, 1, 2, 3, 4, 4]


def test_fgfi_mask_of_two_gts_by_hand():
    anchors, grids = _anchors()
    # both GTs are under 112 px: they belong to the finest level, thresholds 0.5 and 0.25
    fine, coarse = fgfi_masks(anchors, grids, GT, psi=0.5)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, 0] = expected[2, 1] = expected[2, 2] = True
    assert torch.equal(fine, expected)
    # no GT of the coarse level, though GT 0 overlaps its anchor (0, 0) with IoU 0.25
    assert not coarse.any()


def test_fgfi_marks_a_gt_only_on_its_own_level_by_that_levels_best_anchor():
    anchors, grids = _anchors()
    square = torch.tensor([[16.0, 0.0, 32.0, 16.0]])  # the coarse anchor (0, 1); 4 fine at 0.25
    # its own level the coarse one (level scale 8: 16 px is one level up): the fine anchors,
    # under the 0.5 threshold of its best coarse anchor, mark nothing
    fine, coarse = fgfi_masks(anchors, grids, square, psi=0.5, level_scale=8)
    assert not fine.any()
    assert torch.equal(coarse, torch.tensor([[False, True], [False, False]]))
    # its own level the fine one (level scale 16): the threshold comes from the fine anchors
    # alone (0.5 x 0.25), though a coarse anchor matches it exactly
    fine, coarse = fgfi_masks(anchors, grids, square, psi=0.5, level_scale=16)
    expected_fine = torch.zeros(4, 4, dtype=torch.bool)
    expected_fine[0:2, 2:4] = True
    assert torch.equal(fine, expected_fine)
    assert not coarse.any()


def test_fgfi_mask_is_empty_without_gts_or_overlap():
    anchors, grids = _anchors()
    for gt in (torch.zeros(0, 4), torch.tensor([[100.0, 100.0, 120.0, 120.0]])):
        assert not any(m.any() for m in fgfi_masks(anchors, grids, gt))


def test_defeat_mask_puts_each_gt_on_one_level_over_its_cells_as_the_authors_round_them():
    # with a level scale of 16: sqrt(16 * 8) = 11.3 -> level -1, clamped to the finest;
    # sqrt(48 * 32) = 39.2 -> level 1
    gt = torch.tensor([[4.0, 4.0, 20.0, 12.0], [16.0, 0.0, 64.0, 32.0]])
    fine, coarse = defeat_foreground_masks(gt, [(8, 8), (4, 4)], [8, 16], level_scale=16)
    expected_fine = torch.zeros(8, 8)
    # rows floor(4/8)..floor(12/8)-1, columns floor(4/8)..floor(20/8)-1: the cells under the
    # far edges (row 1, column 2), which the box only partly covers, are left out
    expected_fine[0:1, 0:2] = 1
    expected_coarse = torch.zeros(4, 4)
    expected_coarse[0:2, 1:4] = 1
    assert torch.equal(fine, expected_fine)
    assert torch.equal(coarse, expected_coarse)


def test_defeat_mask_of_a_box_within_one_cells_span_is_its_near_corners_cell():
    # 4 px wide inside column 2, 12 px tall over rows 2..3: the one cell (2, 2)
    gt = torch.tensor([[18.0, 18.0, 22.0, 30.0]])
    (fine,) = defeat_foreground_masks(gt, [(8, 8)], [8])
    expected = torch.zeros(8, 8)
    expected[2, 2] = 1
    assert torch.equal(fine, expected)
    # a box starting at the grid's far edge (in the padding) still marks the grid's last cell
    (edge,) = defeat_foreground_masks(torch.tensor([[64.0, 64.0, 66.0, 66.0]]), [(8, 8)], [8])
    assert edge[7, 7] == 1 and edge.sum() == 1
