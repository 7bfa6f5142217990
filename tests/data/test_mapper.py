"""MimicDetDatasetMapper's optional top-to-bottom flip (INPUT.RANDOM_FLIP_VERTICAL)."""

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.structures import BoxMode
from PIL import Image

from mimicdet import add_mimicdet_config
from mimicdet.data import MimicDetDatasetMapper

SIZE = 40
BOX = [5.0, 2.0, 15.0, 10.0]  # XYXY, in the top part of the image
FLIPPED = [5.0, SIZE - 10.0, 15.0, SIZE - 2.0]


def _cfg(vertical, horizontal="none"):
    cfg = get_cfg()
    add_mimicdet_config(cfg)
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TRAIN = (SIZE,)  # the resizes keep the 40 px image as it is
    cfg.INPUT.MIN_SIZE_TEST = SIZE
    cfg.INPUT.RANDOM_FLIP = horizontal
    cfg.INPUT.RANDOM_FLIP_VERTICAL = vertical
    return cfg


def _record(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    path = tmp_path / "tile.png"
    Image.fromarray(pixels).save(path)
    annotation = {"bbox": BOX, "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "iscrowd": 0}
    record = {"file_name": str(path), "image_id": 0, "width": SIZE, "height": SIZE}
    return dict(record, annotations=[annotation]), pixels


def _map_with_seeds(mapper, record, seeds=range(16)):
    outputs = []
    for seed in seeds:
        np.random.seed(seed)
        out = mapper(dict(record, annotations=[dict(a) for a in record["annotations"]]))
        boxes = out["instances"].gt_boxes.tensor if "instances" in out else None  # test: none
        outputs.append((out["image"].permute(1, 2, 0).numpy(), boxes))
    return outputs


def test_vertical_flip_moves_image_and_boxes_together(tmp_path):
    record, pixels = _record(tmp_path)
    outputs = _map_with_seeds(MimicDetDatasetMapper(_cfg(True), is_train=True), record)
    flipped = 0
    for image, boxes in outputs:
        if (image == pixels).all():
            assert torch.allclose(boxes, torch.tensor([BOX]))
        else:
            assert (image == pixels[::-1]).all(), "only a top-to-bottom flip may change the image"
            assert torch.allclose(boxes, torch.tensor([FLIPPED]))
            flipped += 1
    assert 0 < flipped < len(outputs)  # a coin flip, not always or never


def test_no_vertical_flip_by_default(tmp_path):
    record, pixels = _record(tmp_path)
    cfg = get_cfg()
    add_mimicdet_config(cfg)
    assert not cfg.INPUT.RANDOM_FLIP_VERTICAL
    for image, boxes in _map_with_seeds(MimicDetDatasetMapper(_cfg(False), is_train=True), record):
        assert (image == pixels).all() and torch.allclose(boxes, torch.tensor([BOX]))


def test_vertical_flip_is_training_only(tmp_path):
    record, pixels = _record(tmp_path)
    mapper = MimicDetDatasetMapper(_cfg(True), is_train=False)
    for image, _ in _map_with_seeds(mapper, record):
        assert (image == pixels).all()


def test_vertical_flip_twice_is_refused():
    with pytest.raises(ValueError, match="RANDOM_FLIP is already 'vertical'"):
        MimicDetDatasetMapper(_cfg(True, horizontal="vertical"), is_train=True)
