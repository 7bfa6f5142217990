"""tools/coco_cost_benchmark.py: its --amp training step for FCOS, which detectron2's own FCOS
fails under autocast (tests/modeling/test_fcos.py). CPU autocast (bfloat16) takes the same path as
CUDA's float16."""

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import coco_cost_benchmark  # noqa: E402


def test_the_fcos_it_builds_trains_under_autocast():
    from detectron2.utils.events import EventStorage

    args = coco_cost_benchmark.parse_args(["--device", "cpu"])
    args.height, args.width = 128, 192
    model = coco_cost_benchmark.build("fcos", args)
    model.train()
    with EventStorage(), torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(coco_cost_benchmark.make_batch(args))
    assert set(losses) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
    sum(losses.values()).backward()
    head = model.head.bbox_pred.weight.grad
    assert head is not None and torch.isfinite(head).all() and head.abs().sum() > 0
