"""tools/prepare_deepforest.py and the detectron2 registration of its output."""

import importlib.util
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image
from pycocotools.coco import COCO

from conftest import run_beside_another_writer
from mimicdet.data import register_deepforest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "prepare_deepforest.py"
SOURCES = {
    "train": "2019_YELL_2_528000_4978000_image_crop2",
    "val": "2019_YELL_2_541000_4977000_image_crop",
}
SUMMARY = re.compile(
    r"(train|val): .* -> (\d+) tiles \((\d+) without boxes\), (\d+) boxes from (\d+) source "
    r"boxes; (\d+) clipped at tile borders, (\d+) slivers dropped .*, (\d+) source boxes in no tile"
)


def load_tool():
    spec = importlib.util.spec_from_file_location("prepare_deepforest", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(*args):
    result = subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, check=True
    )
    return result.stdout


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Output folder of one run of the tool with default parameters, and the printed summary."""
    output = tmp_path_factory.mktemp("deepforest")
    stdout = run_tool("--output", str(output))
    summary = {}
    for match in SUMMARY.finditer(stdout):
        keys = ("tiles", "empty", "boxes", "source", "clipped", "dropped", "lost")
        summary[match.group(1)] = dict(zip(keys, map(int, match.groups()[1:])))
    assert set(summary) == {"train", "val"}, stdout
    return output, summary


@pytest.fixture
def restore_registration(monkeypatch):
    yield
    # undo the test's MIMICDET_DATASETS first, or the "default" registration keeps its tmp root
    monkeypatch.undo()
    register_deepforest()


def source_boxes(stem):
    data_dir = load_tool().deepforest_data_dir()
    root = ET.parse(data_dir / f"{stem}.xml").getroot()
    keys = ("xmin", "ymin", "xmax", "ymax")
    return [[float(o.find("bndbox").find(k).text) for k in keys] for o in root.iter("object")]


@pytest.mark.parametrize("split", ["train", "val"])
def test_json_is_valid_coco_and_matches_tiles(dataset, split):
    output, summary = dataset
    coco = COCO(str(output / "annotations" / f"{split}.json"))
    assert coco.loadCats(coco.getCatIds()) == [{"id": 1, "name": "Tree", "supercategory": "tree"}]
    assert len(coco.imgs) == summary[split]["tiles"]
    assert len(coco.anns) == summary[split]["boxes"]
    assert sum(not coco.getAnnIds(imgIds=[i]) for i in coco.imgs) == summary[split]["empty"]
    assert sorted(p.name for p in (output / split).glob("*.png")) == sorted(
        im["file_name"] for im in coco.imgs.values()
    )
    for im in coco.imgs.values():
        with Image.open(output / split / im["file_name"]) as tile:
            assert tile.size == (im["width"], im["height"]) and tile.mode == "RGB"
        assert im["width"] <= 400 and im["height"] <= 400
        for ann in coco.imgToAnns[im["id"]]:
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and ann["area"] == pytest.approx(w * h)
            assert 0 <= x and 0 <= y and x + w <= im["width"] and y + h <= im["height"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_source_box_is_kept_or_counted_as_dropped(dataset, split):
    output, summary = dataset
    boxes = source_boxes(SOURCES[split])
    coco = json.loads((output / "annotations" / f"{split}.json").read_text())
    kept = {(a["image_id"], a["source_box"]): a["bbox"] for a in coco["annotations"]}
    intersecting = dropped = 0
    for im in coco["images"]:
        x0, y0 = im["x0"], im["y0"]
        x1, y1 = x0 + im["width"], y0 + im["height"]
        for index, (bx0, by0, bx1, by1) in enumerate(boxes):
            clip = [max(bx0, x0), max(by0, y0), min(bx1, x1), min(by1, y1)]
            if clip[2] <= clip[0] or clip[3] <= clip[1]:
                continue
            intersecting += 1
            visible = (clip[2] - clip[0]) * (clip[3] - clip[1]) / ((bx1 - bx0) * (by1 - by0))
            if (im["id"], index) in kept:
                expected = [clip[0] - x0, clip[1] - y0, clip[2] - clip[0], clip[3] - clip[1]]
                assert kept[im["id"], index] == pytest.approx(expected)
                assert visible >= 0.5
            else:
                assert visible < 0.5
                dropped += 1
    assert summary[split]["source"] == len(boxes) == {"train": 574, "val": 279}[split]
    assert summary[split]["dropped"] == dropped
    assert intersecting == summary[split]["boxes"] + summary[split]["dropped"]
    # The default overlap exceeds the largest crown, so every tree is in some tile.
    assert {index for _, index in kept} == set(range(len(boxes)))
    assert summary[split]["lost"] == 0


def test_splits_use_only_their_source_image(dataset):
    output, _ = dataset
    for split, stem in SOURCES.items():
        coco = json.loads((output / "annotations" / f"{split}.json").read_text())
        assert {im["source_image"] for im in coco["images"]} == {f"{stem}.png"}
        assert all(im["file_name"].startswith(stem + "_") for im in coco["images"])


def test_second_run_is_skipped_and_parameters_are_checked(dataset):
    output, _ = dataset
    json_file = output / "annotations" / "train.json"
    mtime = json_file.stat().st_mtime_ns
    assert "is up to date" in run_tool("--output", str(output))
    assert json_file.stat().st_mtime_ns == mtime

    tool = load_tool()
    data_dir = tool.deepforest_data_dir()
    same = tool.parse_args(["--output", str(output)])
    other = tool.parse_args(["--output", str(output), "--min-visible", "0.3"])
    assert tool.outputs_match(output, tool.expected_manifest(data_dir, same))
    assert not tool.outputs_match(output, tool.expected_manifest(data_dir, other))


def test_tile_origins_cover_the_image_with_the_requested_overlap():
    tool = load_tool()
    assert tool.tile_origins(300, 400, 280) == [0]
    for length in (400, 1035, 1249, 2299, 2472):
        origins = tool.tile_origins(length, 400, 280)
        assert origins[0] == 0 and origins[-1] == length - 400
        assert all(0 < b - a <= 280 for a, b in zip(origins, origins[1:]))


def test_interrupted_write_leaves_nothing(tmp_path):
    tool = load_tool()

    def fail(tmp):
        Path(tmp).write_text("{half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tool.atomic_write(tmp_path / "train.json", fail)
    assert list(tmp_path.iterdir()) == []


def test_stale_outputs_go_but_another_writers_file_in_the_making_stays(tmp_path):
    """Two preparations side by side once deleted each other's half-written files (2026-12-05)."""
    tool = load_tool()
    for name in ("kept.png", "stale.png", ".kept.png.x1y2.png", "notes.txt"):
        (tmp_path / name).write_text(name)
    tool.remove_stale(tmp_path, "*.png", {"kept.png"})
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".kept.png.x1y2.png", "kept.png", "notes.txt"]


def test_a_second_preparation_waits_then_finds_the_tiles_up_to_date(dataset):
    """Two lanes of the benchmark once prepared the same folder at once (2026-12-05)."""
    output, _ = dataset
    tool = run_beside_another_writer(
        [sys.executable, str(TOOL), "--output", str(output)], output
    )
    assert tool.returncode == 0, tool.stderr
    waited, rest = tool.stdout.split("\n", 1)
    assert waited == f"waiting for another process preparing {output}"
    assert "is up to date" in rest


def test_missing_deepforest_package_says_how_to_install(monkeypatch):
    tool = load_tool()
    monkeypatch.setattr(tool.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match="make setup"):
        tool.deepforest_data_dir()


def test_registered_datasets_give_detectron2_dicts(dataset, restore_registration):
    output, summary = dataset
    register_deepforest(output)
    register_deepforest(output)  # registering twice is harmless
    for split in ("train", "val"):
        dicts = DatasetCatalog.get(f"deepforest_{split}")
        assert len(dicts) == summary[split]["tiles"]
        assert sum(len(d["annotations"]) for d in dicts) == summary[split]["boxes"]
        # Tiles without trees are kept as background examples.
        assert sum(not d["annotations"] for d in dicts) == summary[split]["empty"]
        first = next(d for d in dicts if d["annotations"])
        assert Path(first["file_name"]).is_file() and first["height"] > 0 and first["width"] > 0
        ann = first["annotations"][0]
        assert ann["category_id"] == 0 and ann["bbox_mode"] == BoxMode.XYWH_ABS
        meta = MetadataCatalog.get(f"deepforest_{split}")
        assert meta.thing_classes == ["Tree"] and meta.evaluator_type == "coco"
        assert meta.json_file == str(output / "annotations" / f"{split}.json")


def test_missing_files_raise_only_when_used(tmp_path, monkeypatch, restore_registration):
    monkeypatch.setenv("MIMICDET_DATASETS", str(tmp_path))
    register_deepforest()
    assert MetadataCatalog.get("deepforest_val").image_root == str(tmp_path / "deepforest" / "val")
    with pytest.raises(FileNotFoundError, match="python tools/prepare_deepforest.py"):
        DatasetCatalog.get("deepforest_val")
