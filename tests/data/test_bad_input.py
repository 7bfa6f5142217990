"""Badly converted datasets fail early with messages naming the file, or are cleaned and counted."""

import json
import logging
import uuid

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode
from PIL import Image

from mimicdet.data import MimicDetDatasetMapper, check_detection_dataset_dicts

SIZE = 40


def _image(path, mode="RGB", size=(SIZE, SIZE)):
    """Writes a random image of PIL ``mode`` and ``size`` (w, h) to ``path``; returns it as str."""
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return str(path)


def _record(file_name, boxes, category_ids=None, size=(SIZE, SIZE)):
    """A dataset dict with XYXY_ABS ``boxes``; ``size`` is (w, h), or None to leave it out."""
    category_ids = category_ids or [0] * len(boxes)
    record = {
        "file_name": file_name,
        "image_id": 0,
        "annotations": [
            {"bbox": list(b), "bbox_mode": BoxMode.XYXY_ABS, "category_id": c, "iscrowd": 0}
            for b, c in zip(boxes, category_ids)
        ],
    }
    if size is not None:
        record["width"], record["height"] = size
    return record


def _mapper():
    """The training mapper detectron2's default config gives, for a dataset named "bad_input"."""
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = ("bad_input",)
    return MimicDetDatasetMapper(cfg, is_train=True)


# --- check_detection_dataset_dicts --------------------------------------------------------------


def test_empty_image_list_names_the_dataset():
    with pytest.raises(ValueError, match="'my_set' has no images.*registered"):
        check_detection_dataset_dicts([], "my_set", num_classes=2)


def test_missing_files_are_listed_with_their_count(tmp_path):
    present = _record(_image(tmp_path / "ok.png"), [])
    missing = [_record(str(tmp_path / f"gone{i}.png"), []) for i in range(7)]
    with pytest.raises(FileNotFoundError) as e:
        check_detection_dataset_dicts([present] + missing, "my_set", num_classes=2)
    message = str(e.value)
    assert "'my_set'" in message and "7 of 8" in message
    assert "gone0.png" in message and "gone4.png" in message and "2 more" in message
    assert "ok.png" not in message


def test_degenerate_boxes_are_dropped_counted_and_logged(tmp_path, caplog):
    file_name = _image(tmp_path / "a.png")
    boxes = [(5, 5, 20, 20), (10, 10, 10, 30), (10, 30, 20, 10), (0, 0, float("nan"), 9)]
    record = _record(file_name, boxes)
    with caplog.at_level(logging.INFO):
        out = check_detection_dataset_dicts([record], "my_set", num_classes=1)
    assert [a["bbox"] for a in out[0]["annotations"]] == [[5, 5, 20, 20]]
    assert len(record["annotations"]) == 4, "the input must not be modified"
    assert "dropped 3 with zero or negative size" in caplog.text
    assert f"[10, 10, 10, 30] in {file_name}" in caplog.text


def test_zero_size_xywh_box_is_dropped(tmp_path):
    record = _record(_image(tmp_path / "a.png"), [])
    record["annotations"] = [
        {"bbox": [3, 3, 0, 8], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0},
        {"bbox": [3, 3, 5, 8], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0},
    ]
    out = check_detection_dataset_dicts([record], "my_set", num_classes=1)
    assert out[0]["annotations"] == record["annotations"][1:]


def test_boxes_outside_the_image_are_clipped_or_dropped(tmp_path, caplog):
    boxes = [(-5, 2, 10, 50), (SIZE + 1, 0, SIZE + 9, 9), (-9, -9, 0, 0), (1, 1, 9, 9)]
    record = _record(_image(tmp_path / "a.png"), boxes)
    with caplog.at_level(logging.INFO):
        out = check_detection_dataset_dicts([record], "my_set", num_classes=1)
    assert [a["bbox"] for a in out[0]["annotations"]] == [[0, 2, 10, SIZE], [1, 1, 9, 9]]
    assert record["annotations"][0]["bbox"] == [-5, 2, 10, 50], "the input must not be modified"
    assert "clipped 1 and dropped 2 outside the image" in caplog.text


def test_boxes_are_not_clipped_without_the_image_size(tmp_path):
    record = _record(_image(tmp_path / "a.png"), [(-5, 2, 10, 50)], size=None)
    out = check_detection_dataset_dicts([record], "my_set", num_classes=1)
    assert out[0]["annotations"][0]["bbox"] == [-5, 2, 10, 50]


@pytest.mark.parametrize("category_id", [2, -1, 1.0, "1", None])
def test_bad_category_id_names_file_and_id(tmp_path, category_id):
    file_name = _image(tmp_path / "a.png")
    record = _record(file_name, [(1, 1, 9, 9)], category_ids=[category_id])
    with pytest.raises(ValueError, match="register_coco_instances") as e:
        check_detection_dataset_dicts([record], "my_set", num_classes=2)
    assert "'my_set'" in str(e.value) and file_name in str(e.value)
    assert f"category_id {category_id!r}" in str(e.value)


def test_noncontiguous_coco_ids_become_contiguous_through_load_coco_json(tmp_path):
    image = {"id": 1, "file_name": "a.png", "height": SIZE, "width": SIZE}
    _image(tmp_path / "a.png")
    annotations = [
        {"id": i + 1, "image_id": 1, "category_id": c, "bbox": [2, 2, 9, 9], "iscrowd": 0}
        for i, c in enumerate([3, 7, 7])
    ]
    categories = [{"id": 3, "name": "oak"}, {"id": 7, "name": "pine"}]
    json_file = tmp_path / "coco.json"
    json_file.write_text(
        json.dumps({"images": [image], "annotations": annotations, "categories": categories})
    )

    # Without a dataset name detectron2 keeps the raw ids, which the check rejects.
    raw = load_coco_json(str(json_file), str(tmp_path))
    with pytest.raises(ValueError, match="category_id 3"):
        check_detection_dataset_dicts(raw, "raw", num_classes=2)

    name = f"noncontiguous_{uuid.uuid4().hex}"
    try:
        dicts = load_coco_json(str(json_file), str(tmp_path), name)
        out = check_detection_dataset_dicts(dicts, name, num_classes=2)
        assert [a["category_id"] for a in out[0]["annotations"]] == [0, 1, 1]
        assert MetadataCatalog.get(name).thing_classes == ["oak", "pine"]
        instances = _mapper()(out[0])["instances"]
        assert instances.gt_classes.tolist() == [0, 1, 1]
    finally:
        MetadataCatalog.remove(name)


def test_images_without_annotations_are_kept_and_counted(tmp_path, caplog):
    empty = _record(_image(tmp_path / "empty.png"), [])
    unlabeled = {"file_name": _image(tmp_path / "unlabeled.png"), "image_id": 1}
    all_dropped = _record(_image(tmp_path / "dropped.png"), [(3, 3, 3, 3)])
    crowd_only = _record(_image(tmp_path / "crowd.png"), [(-9, 1, 0, 30)])
    crowd_only["annotations"][0]["iscrowd"] = 1
    labeled = _record(_image(tmp_path / "labeled.png"), [(1, 1, 9, 9)])
    dicts = [empty, unlabeled, all_dropped, crowd_only, labeled]
    with caplog.at_level(logging.INFO):
        out = check_detection_dataset_dicts(dicts, "my_set", num_classes=1)
    assert [r["file_name"] for r in out] == [r["file_name"] for r in dicts]
    assert "annotations" not in out[1]
    assert out[3]["annotations"] == crowd_only["annotations"], "crowd boxes are left as they are"
    assert "4 images have no boxes (kept)" in caplog.text


# --- MimicDetDatasetMapper ----------------------------------------------------------------------


def test_mapper_missing_file_error_names_file_and_dataset(tmp_path):
    file_name = str(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match="missing.png.*'bad_input'") as e:
        _mapper()(_record(file_name, []))
    assert isinstance(e.value.__cause__, FileNotFoundError)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_mapper_corrupt_file_error_names_file(tmp_path, damage):
    path = tmp_path / "x.png"
    if damage == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(200))
    else:
        data = open(_image(path), "rb").read()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="Cannot read image .*x.png") as e:
        _mapper()(_record(str(path), []))
    assert e.value.__cause__ is not None


def test_mapper_rejects_16_bit_images(tmp_path):
    path = str(tmp_path / "deep.png")
    Image.fromarray(np.full((SIZE, SIZE), 4000, dtype=np.uint16)).save(path)
    with pytest.raises(ValueError, match="deep.png.*'I;16'"):
        _mapper()(_record(path, []))


@pytest.mark.parametrize(
    "mode, suffix", [("L", "png"), ("P", "png"), ("RGBA", "png"), ("CMYK", "jpg")]
)
@pytest.mark.parametrize("image_format", ["BGR", "RGB"])
def test_mapper_gives_three_channels_for_any_8_bit_layout(tmp_path, mode, suffix, image_format):
    path = _image(tmp_path / f"a.{suffix}", mode)
    with Image.open(path) as pil_image:
        assert pil_image.mode == mode
        expected = np.asarray(pil_image.convert("RGB"))
    if image_format == "BGR":
        expected = expected[:, :, ::-1]
    mapper = MimicDetDatasetMapper(False, augmentations=[], image_format=image_format)
    image = mapper(_record(path, []))["image"]
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.uint8
    assert (image.permute(1, 2, 0).numpy() == expected).all()


@pytest.mark.parametrize("size", [(32, 32), (64, 2000), (2000, 64)])
def test_mapper_handles_tiny_and_elongated_images(tmp_path, size):
    w, h = size
    boxes = [(0, 0, w, h), (w / 4, h / 4, w / 2, h / 2)]
    record = _record(_image(tmp_path / "a.png", size=size), boxes, size=size)
    for seed in range(2):  # RandomFlip keeps the image with seed 0 and flips it with seed 1
        np.random.seed(seed)
        out = _mapper()(record)
        height, width = out["image"].shape[1:]
        assert out["instances"].image_size == (height, width)
        assert min(height, width) > 0
        boxes = out["instances"].gt_boxes.tensor
        assert len(boxes) == 2
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= width).all()
        assert (boxes[:, [1, 3]] <= height).all()
