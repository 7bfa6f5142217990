"""tools/prepare_fashion_scenes.py, the scene composer and the registration of its output."""

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from pycocotools.coco import COCO

from conftest import run_beside_another_writer
from mimicdet.data.fashion_scenes import (
    FASHION_CLASSES,
    compose_scene,
    read_idx,
    register_fashion_scenes,
    write_idx,
)

TOOL = Path(__file__).resolve().parents[2] / "tools" / "prepare_fashion_scenes.py"


def fake_source(root, train_labels=range(5), test_labels=range(5, 10), count=20):
    """Fashion-MNIST's four files with ``count`` blob photos each; train and test photos carry
    disjoint labels, so a scene's categories tell which source split its objects came from."""
    rng = np.random.RandomState(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, labels in (("train", train_labels), ("t10k", test_labels)):
        photos = np.zeros((count, 28, 28), np.uint8)
        for photo in photos:
            y0, x0 = rng.randint(0, 8, size=2)
            photo[y0 : y0 + 14 + rng.randint(6), x0 : x0 + 14 + rng.randint(6)] = 200
        write_idx(root / f"{split}-images-idx3-ubyte.gz", photos)
        labels = rng.choice(list(labels), size=count).astype(np.uint8)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


def run_tool(*args, env=None):
    return subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, env=env
    )


def files_of(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.*")}


def test_the_photo_subset_composes_the_very_same_scenes(tmp_path):
    """What tools/gpu_check.sh carries instead of the 30 MiB source: black photos where the scenes
    never read one. Scenes of 96 px are crowded, so some photos are drawn, steer the random draws,
    and are then left out for lack of room: the subset must keep those too."""
    source = fake_source(tmp_path / "src", count=400)
    sizes = ["--image-size", "96", "--train-images", "12", "--val-images", "6"]
    full, subset = tmp_path / "full", tmp_path / "subset"
    made = run_tool(
        "--source", str(source), "--output", str(full), "--photo-subset", str(subset), *sizes
    )
    assert made.returncode == 0, made.stderr

    for split, src in (("train", "train"), ("val", "t10k")):
        photos = read_idx(subset / f"{src}-images-idx3-ubyte.gz")
        original = read_idx(source / f"{src}-images-idx3-ubyte.gz")
        kept = {int(i) for i in np.flatnonzero(photos.reshape(len(photos), -1).any(axis=1))}
        annotations = json.loads((full / "annotations" / f"{split}.json").read_text())
        pasted = {a["source_photo"] for a in annotations["annotations"]}
        # every pasted photo kept as it was, some drawn-but-dropped ones too, most made black
        assert pasted < kept and len(kept) < len(original) // 2
        assert all((photos[i] == original[i]).all() for i in kept)
        labels = f"{src}-labels-idx1-ubyte.gz"
        assert (read_idx(subset / labels) == read_idx(source / labels)).all()

    # from the subset, named by the environment as on the GPU machine: byte for byte the same
    env = {**os.environ, "MIMICDET_FASHION_MNIST": str(subset)}
    again = run_tool("--output", str(tmp_path / "again"), *sizes, env=env)
    assert again.returncode == 0, again.stderr
    first, second = files_of(full), files_of(tmp_path / "again")
    first.pop("manifest.json"), second.pop("manifest.json")  # it names the source's hashes
    assert sorted(first) == sorted(second) and len(first) == 2 + 12 + 6
    assert all(first[name] == second[name] for name in first)


def test_prepared_scenes_are_valid_coco_with_split_disjoint_photos(tmp_path):
    source, output = fake_source(tmp_path / "src"), tmp_path / "scenes"
    opts = ["--source", str(source), "--output", str(output), "--image-size", "256",
            "--train-images", "6", "--val-images", "4"]  # fmt: skip
    first = run_tool(*opts)
    assert first.returncode == 0, first.stderr
    assert "train: 6 scenes" in first.stdout and "val: 4 scenes" in first.stdout
    for split, labels in (("train", range(1, 6)), ("val", range(6, 11))):
        coco = COCO(str(output / "annotations" / f"{split}.json"))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(FASHION_CLASSES)
        anns = coco.loadAnns(coco.getAnnIds())
        assert anns and {a["category_id"] for a in anns} <= set(labels)
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 256 and y + h <= 256 and w >= 2 and h >= 2
            assert ann["area"] == w * h
        for image in coco.loadImgs(coco.getImgIds()):
            assert (output / split / image["file_name"]).is_file()
    # the same parameters and sources: nothing is written again
    again = run_tool(*opts)
    assert again.returncode == 0 and "is up to date" in again.stdout

    register_fashion_scenes(output)
    try:
        records = DatasetCatalog.get("fashion_scenes_val")
        assert len(records) == 4
        assert MetadataCatalog.get("fashion_scenes_val").thing_classes == list(FASHION_CLASSES)
    finally:
        register_fashion_scenes()  # back to the default root for other tests


def test_a_second_preparation_waits_for_the_first_then_composes(tmp_path):
    """Two lanes of the benchmark once composed the same scenes at once, and one deleted the
    other's files in the making (2026-12-05)."""
    source, output = fake_source(tmp_path / "src"), tmp_path / "scenes"
    command = [sys.executable, str(TOOL), "--source", str(source), "--output", str(output),
               "--image-size", "96", "--train-images", "2", "--val-images", "2"]  # fmt: skip
    tool = run_beside_another_writer(command, output)
    assert tool.returncode == 0, tool.stderr
    waited, rest = tool.stdout.split("\n", 1)
    assert waited == f"waiting for another process preparing {output}"
    assert "train: 2 scenes" in rest and (output / "manifest.json").is_file()


def test_missing_source_says_how_to_install_it_and_writes_nothing(tmp_path):
    result = run_tool("--source", str(tmp_path / "absent"), "--output", str(tmp_path / "out"))
    assert result.returncode != 0
    assert "train-images-idx3-ubyte.gz is missing" in result.stderr
    assert "apt-get install dataset-fashion-mnist" in result.stderr
    assert "$MIMICDET_FASHION_MNIST" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_corrupt_idx_file_is_named(tmp_path):
    bad = tmp_path / "bad-images-idx3-ubyte.gz"
    with gzip.open(bad, "wb") as f:
        f.write(struct.pack(">iiii", 2051, 3, 28, 28) + bytes(100))
    with pytest.raises(ValueError, match="bad-images-idx3-ubyte.gz: header says shape"):
        read_idx(bad)


def test_a_pasted_box_is_the_object_it_labels():
    """Two photos with black margins: a tall one labelled 2 and a wide one labelled 9. Each box is
    the photo's silhouette edge to edge (one flat tint, no margin or background inside), its shape
    is its own photo's, and the pixels right outside are the background's."""
    photos = np.zeros((2, 28, 28), np.uint8)
    photos[0, 4:25, 10:19] = 255  # 21 x 9: tall
    photos[1, 10:19, 2:27] = 255  # 9 x 25: wide
    labels = np.array([2, 9])
    rng = np.random.RandomState(3)
    seen = set()
    for _ in range(20):
        image, objects = compose_scene(rng, photos, labels, (256, 256), objects=(1, 1))
        (obj,) = objects
        x0, y0, x1, y1 = obj["bbox"]
        assert obj["label"] == labels[obj["photo"]]
        seen.add(obj["label"])
        aspect = (y1 - y0) / (x1 - x0)
        expected = 21 / 9 if obj["label"] == 2 else 9 / 25
        # the size draw jitters the photo's aspect by up to 20%, rounding adds a little
        assert expected / 1.35 < aspect < expected * 1.35, (obj, aspect)
        inside = image[y0:y1, x0:x1].reshape(-1, 3).astype(float)
        assert inside.std(axis=0).max() < 1.0  # one flat tint: the object, edge to edge
        # the background's pixel noise (sigma 8) shows right above or below the box
        strip = image[y0 - 2] if y0 >= 2 else image[y1 + 1]
        assert strip[x0:x1].astype(float).std(axis=0).max() > 3.0
    assert seen == {2, 9}


def test_object_sizes_follow_coco_small_medium_large_mix():
    photos = np.full((1, 28, 28), 255, np.uint8)
    rng = np.random.RandomState(0)
    areas = []
    for _ in range(60):
        _, objects = compose_scene(rng, photos, np.array([0]), (512, 512))
        areas += [(o["bbox"][2] - o["bbox"][0]) * (o["bbox"][3] - o["bbox"][1]) for o in objects]
    areas = np.array(areas)
    shares = [(areas < 32**2).mean(), ((areas >= 32**2) & (areas < 96**2)).mean()]
    # COCO: 41% small, 34% medium, 25% large; placement drops some large ones (overlap rule)
    assert len(areas) > 200
    assert 0.33 < shares[0] < 0.55 and 0.27 < shares[1] < 0.45 and 1 - sum(shares) > 0.1
