"""Level assignment: scale ranges matched to the anchors, the canonical rule, COCO-sized boxes."""

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, Instances

from mimicdet.data.synthetic_coco import coco_like_boxes
from mimicdet.modeling import LevelAssigner, RefinementModule

LEVELS = [3, 4, 5, 6, 7]
ANCHORS = [32.0, 64.0, 128.0, 256.0, 512.0]


def _squares(sizes):
    return torch.tensor([[0.0, 0.0, s, s] for s in sizes])


def test_anchor_scale_ranges_are_octaves_centred_on_the_anchor_sizes():
    assigner = LevelAssigner(levels=LEVELS, anchor_sizes=ANCHORS)
    # boundaries at 32 * 2^(k + 0.5): 45.25, 90.5, 181, 362; below P3's range -> P3, above P7's
    # -> P7
    sizes = [4, 32, 45, 46, 64, 90, 91, 128, 180, 182, 256, 361, 363, 512, 2000]
    expected = [3, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6, 7, 7, 7]
    assert assigner.nearest_levels(_squares(sizes)).tolist() == expected
    mask = assigner.level_mask(_squares(sizes))
    assert mask.sum(dim=1).tolist() == [1] * len(sizes)
    assert (torch.tensor(LEVELS)[mask.int().argmax(dim=1)]).tolist() == expected


def test_wider_ranges_overlap_as_foveabox():
    assigner = LevelAssigner(levels=LEVELS, anchor_sizes=ANCHORS, scale_range_half_width=1.0)
    # [a / 2, 2a) per level: 64 lies in P4's [32, 128) and P5's [64, 256), not P3's [16, 64)
    mask = assigner.level_mask(_squares([64, 20, 10, 1500, 100]))
    trained = [[lvl for lvl, m in zip(LEVELS, row) if m] for row in mask.tolist()]
    assert trained == [[4, 5], [3], [3], [7], [4, 5]]
    # the nearest level (the T-head's level for an appended GT) is one of them
    assert assigner.nearest_levels(_squares([64, 20, 10, 1500, 100])).tolist() == [4, 3, 3, 7, 5]


def test_canonical_rule_is_detectron2s_pooler_rule():
    assigner = LevelAssigner(levels=LEVELS, rule="canonical", anchor_sizes=ANCHORS)
    # floor(4 + log2(s / 224)): 400 -> 4.84 -> P4 (round would give P5)
    sizes = [64, 223, 224, 400, 447, 448, 900, 2000]
    assert assigner.nearest_levels(_squares(sizes)).tolist() == [3, 3, 4, 4, 4, 5, 6, 7]
    assert assigner.level_mask(_squares(sizes)).sum(dim=1).tolist() == [1] * len(sizes)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="Unknown level assignment rule 'fovea'"):
        LevelAssigner(levels=LEVELS, rule="fovea", anchor_sizes=ANCHORS)
    with pytest.raises(ValueError, match="doubling"):
        LevelAssigner(levels=LEVELS, anchor_sizes=[32.0, 64.0, 96.0, 256.0, 512.0])
    with pytest.raises(ValueError, match="gaps"):
        LevelAssigner(levels=LEVELS, anchor_sizes=ANCHORS, scale_range_half_width=0.4)


def test_refinement_refuses_ranges_that_do_not_match_its_anchors(cfg):
    shapes = [ShapeSpec(channels=8, stride=2**lvl) for lvl in LEVELS]
    cfg.MODEL.MIMICDET.REFINE.ANCHOR_SIZE_PER_STRIDE = 8.0
    module = RefinementModule(cfg, shapes)  # the config's rule follows the anchors
    assert module.level_assigner.anchor_sizes == [64.0, 128.0, 256.0, 512.0, 1024.0]
    args = RefinementModule.from_config(cfg, shapes)
    args["level_assigner"] = LevelAssigner(levels=LEVELS, anchor_sizes=ANCHORS)
    with pytest.raises(ValueError, match="must match the anchors"):
        RefinementModule(**args)


@pytest.mark.parametrize("rule", ["anchor_scale", "canonical"])
def test_coco_sized_boxes_train_every_level(cfg, rule):
    """
    20 images of 800x1333 with 10 boxes each, COCO's mix (41% small, 34% medium, 25% large):
    every level P3..P7 gets positive anchors under the default rule; detectron2's RoI-pooler
    rule leaves P6 and P7 none (why it is no longer the default).
    """
    cfg.MODEL.MIMICDET.REFINE.LEVEL_ASSIGNMENT = rule
    size = (800, 1333)
    module = RefinementModule(cfg, [ShapeSpec(channels=8, stride=2**lvl) for lvl in LEVELS])
    feats = [torch.zeros(1, 8, -(-size[0] // 2**lvl), -(-size[1] // 2**lvl)) for lvl in LEVELS]
    anchors, anchor_levels = module.anchors(feats)
    gts = [
        Instances(size, gt_boxes=Boxes(torch.from_numpy(coco_like_boxes(10, size, seed=i))))
        for i in range(20)
    ]
    areas = torch.cat([g.gt_boxes.area() for g in gts])
    small, large = (areas < 32**2).float().mean(), (areas > 96**2).float().mean()
    assert 0.3 < small < 0.5 and 0.15 < large < 0.35
    labels, _ = module.label_anchors(anchors, anchor_levels, gts)
    positives = torch.bincount(
        anchor_levels[(labels == 1).nonzero()[:, 1]] - 3, minlength=len(LEVELS)
    ).tolist()
    if rule == "anchor_scale":
        assert all(n > 0 for n in positives), positives
    else:
        assert positives[3:] == [0, 0] and positives[0] > 0, positives
