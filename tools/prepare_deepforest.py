#!/usr/bin/env python
"""Tile the aerial tree-crown images shipped in the ``deepforest`` package into COCO datasets.

train: tiles of ``2019_YELL_2_528000_4978000_image_crop2`` (2299x2472, 574 boxes)
val:   tiles of ``2019_YELL_2_541000_4977000_image_crop`` (1249x1035, 279 boxes)

The package's other annotated images (OSBS_029, SOAP_061, ...) are kept out of both splits so they
stay available for independent checks.

Output layout::

    <output>/train/*.png  <output>/val/*.png
    <output>/annotations/train.json  <output>/annotations/val.json
    <output>/manifest.json   (parameters + source hashes; a matching manifest makes reruns a no-op)
"""

import argparse
import contextlib
import csv
import fcntl
import hashlib
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
# Bump when the output format changes so that old outputs are regenerated.
FORMAT_VERSION = 1
CATEGORY = {"id": 1, "name": "Tree", "supercategory": "tree"}
# split -> (image stem inside deepforest/data, expected number of boxes in its .xml)
SPLITS = {
    "train": ("2019_YELL_2_528000_4978000_image_crop2", 574),
    "val": ("2019_YELL_2_541000_4977000_image_crop", 279),
}


def deepforest_data_dir():
    """Directory of the images shipped in the deepforest wheel, found without importing it."""
    spec = importlib.util.find_spec("deepforest")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "The 'deepforest' package is not installed; its data files are the source of this "
            "dataset. Run `make setup` (or `pip install --no-deps deepforest==2.1.0`)."
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def read_voc_boxes(xml_path):
    """Returns the image size (w, h) and a list of [x0, y0, x1, y1] "Tree" boxes from a VOC .xml."""
    root = ET.parse(xml_path).getroot()
    size = root.find("size")
    width, height = int(size.find("width").text), int(size.find("height").text)
    boxes = []
    for obj in root.iter("object"):
        name = obj.find("name").text
        if name != CATEGORY["name"]:
            raise ValueError(f"{xml_path}: unexpected class {name!r}")
        bndbox = obj.find("bndbox")
        box = [float(bndbox.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
        if not (0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height):
            raise ValueError(
                f"{xml_path}: box {box} is empty or outside the {width}x{height} image"
            )
        boxes.append(box)
    return (width, height), boxes


def cross_check_csvs(data_dir, image_name, boxes):
    """Prints how every .csv in the package that lists ``image_name`` compares with the .xml."""
    xml_boxes = {tuple(b) for b in boxes}
    for csv_path in sorted(data_dir.glob("*.csv")):
        with open(csv_path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("image_path") == image_name]
        if not rows:
            continue
        rows_boxes = [tuple(float(r[k]) for k in ("xmin", "ymin", "xmax", "ymax")) for r in rows]
        matched = sum(b in xml_boxes for b in rows_boxes)
        status = "agrees" if matched == len(rows) == len(boxes) else "differs; the .xml is used"
        print(
            f"  {csv_path.name} lists {len(rows)} boxes for {image_name}, {matched} of them in the "
            f".xml ({len(boxes)} boxes): {status}"
        )


def tile_origins(length, tile, stride):
    """Tile start offsets along one axis, spread evenly from 0 to ``length - tile``.

    Uses the fewest tiles whose spacing is at most ``stride``, so the overlap is at least the
    requested one and no tile nearly duplicates its neighbour at the far border.
    """
    if length <= tile:
        return [0]
    gaps = math.ceil((length - tile) / stride)
    return [round(i * (length - tile) / gaps) for i in range(gaps + 1)]


def clip_box(box, x0, y0, x1, y1):
    """Intersection of ``box`` with the window [x0, x1) x [y0, y1), or None if it is empty."""
    bx0, by0 = max(box[0], x0), max(box[1], y0)
    bx1, by1 = min(box[2], x1), min(box[3], y1)
    if bx1 <= bx0 or by1 <= by0:
        return None
    return [bx0, by0, bx1, by1]


def area(box):
    return (box[2] - box[0]) * (box[3] - box[1])


def atomic_write(path, write):
    """Calls ``write(tmp_path)`` then renames, so ``path`` is either absent or complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def remove_stale(folder, pattern, written):
    """Deletes the files of ``folder`` matching ``pattern`` that are not in ``written``, but not
    dot-names: those are :func:`atomic_write`'s files in the making, perhaps another process's."""
    for stale in folder.glob(pattern):
        if stale.name not in written and not stale.name.startswith("."):
            stale.unlink()


@contextlib.contextmanager
def one_writer_at_a_time(output):
    """Held while a tool checks and writes ``output``. Two preparations of one folder at once (two
    benchmark lanes on a fresh machine, 2026-12-05; or the demo beside a benchmark) would each
    write the same files, one removing the other's half-written ones: the second waits, then
    finds the folder up to date."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output.parent / f".{output.name}.writer.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process preparing {output}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def atomic_write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f)

    atomic_write(path, write)


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tile_split(split, stem, expected_boxes, data_dir, output, tile_size, overlap, min_visible):
    """Writes the tiles and the COCO json of one split; returns its statistics and tile names."""
    (width, height), boxes = read_voc_boxes(data_dir / f"{stem}.xml")
    if len(boxes) != expected_boxes:
        raise ValueError(
            f"{stem}.xml has {len(boxes)} boxes, expected {expected_boxes}: the deepforest data "
            "changed; pin deepforest==2.1.0"
        )
    cross_check_csvs(data_dir, f"{stem}.png", boxes)
    image = Image.open(data_dir / f"{stem}.png").convert("RGB")
    if image.size != (width, height):
        raise ValueError(f"{stem}: image is {image.size}, the .xml says {(width, height)}")

    stride = max(1, round(tile_size * (1 - overlap)))
    split_dir = output / split
    split_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    stats = {"tiles": 0, "empty_tiles": 0, "boxes": 0, "clipped": 0, "dropped": 0}
    seen = set()
    for y0 in tile_origins(height, tile_size, stride):
        for x0 in tile_origins(width, tile_size, stride):
            x1, y1 = min(x0 + tile_size, width), min(y0 + tile_size, height)
            image_id = len(images) + 1
            file_name = f"{stem}_x{x0}_y{y0}.png"
            tile_boxes = []
            for index, box in enumerate(boxes):
                clipped = clip_box(box, x0, y0, x1, y1)
                if clipped is None:
                    continue
                if clipped != box:
                    # A crown cut to a sliver at the border is not recognisable as a tree.
                    if area(clipped) < min_visible * area(box):
                        stats["dropped"] += 1
                        continue
                    stats["clipped"] += 1
                seen.add(index)
                tile_boxes.append(clipped)
                bx0, by0 = clipped[0] - x0, clipped[1] - y0
                bw, bh = clipped[2] - clipped[0], clipped[3] - clipped[1]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": CATEGORY["id"],
                        "bbox": [bx0, by0, bw, bh],
                        "area": bw * bh,
                        "iscrowd": 0,
                        # Index of the box in the source .xml, for tracing a tile box back.
                        "source_box": index,
                    }
                )
            tile = image.crop((x0, y0, x1, y1))
            atomic_write(split_dir / file_name, lambda tmp: tile.save(tmp, format="PNG"))
            images.append(
                {
                    "id": image_id,
                    "file_name": file_name,
                    "width": x1 - x0,
                    "height": y1 - y0,
                    # Where the tile sits in the source image.
                    "source_image": f"{stem}.png",
                    "x0": x0,
                    "y0": y0,
                }
            )
            stats["tiles"] += 1
            stats["empty_tiles"] += not tile_boxes
            stats["boxes"] += len(tile_boxes)
    stats["source_boxes"] = len(boxes)
    stats["lost"] = len(boxes) - len(seen)

    # Tiles left over from a run with other parameters would be picked up by nothing but waste
    # space and confuse anyone browsing the folder.
    written = {im["file_name"] for im in images}
    remove_stale(split_dir, "*.png", written)
    coco = {
        "info": {"description": f"deepforest {stem} tiled {tile_size}px, overlap {overlap}"},
        "images": images,
        "annotations": annotations,
        "categories": [CATEGORY],
    }
    atomic_write_json(output / "annotations" / f"{split}.json", coco)
    return stats, sorted(written)


def expected_manifest(data_dir, args):
    sources = {}
    for stem, _ in SPLITS.values():
        for suffix in (".png", ".xml"):
            sources[stem + suffix] = sha256(data_dir / (stem + suffix))
    params = {"tile_size": args.tile_size, "overlap": args.overlap, "min_visible": args.min_visible}
    return {"format_version": FORMAT_VERSION, "params": params, "sources": sources}


def outputs_match(output, manifest, splits=SPLITS):
    """True if a previous run with the same parameters and sources finished writing ``output``
    (the manifest, and each split's json and every image it lists)."""
    try:
        with open(output / "manifest.json") as f:
            previous = json.load(f)
    except (OSError, ValueError):
        return False
    if {k: previous.get(k) for k in manifest} != manifest:
        return False
    for split in splits:
        files = previous.get("files", {}).get(split, [])
        json_path = output / "annotations" / f"{split}.json"
        if not files or not json_path.is_file():
            return False
        if not all((output / split / name).is_file() for name in files):
            return False
    return True


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--output",
        type=Path,
        default=REPO_ROOT / "datasets" / "deepforest",
        help="dataset folder (default: <repo>/datasets/deepforest)",
    )
    parser.add_argument("--tile-size", type=int, default=400, help="tile side in pixels")
    # 0.3 x 400 = 120 px of overlap exceeds the largest crown (108 px), so every crown lies
    # wholly inside at least one tile and clipping never loses a tree.
    parser.add_argument("--overlap", type=float, default=0.3, help="tile overlap fraction [0, 1)")
    parser.add_argument(
        "--min-visible",
        type=float,
        default=0.5,
        help="drop a clipped box whose visible area is below this fraction of the original",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if outputs match")
    args = parser.parse_args(argv)
    if args.tile_size <= 0:
        parser.error("--tile-size must be positive")
    if not 0 <= args.overlap < 1:
        parser.error("--overlap must be in [0, 1)")
    if not 0 <= args.min_visible <= 1:
        parser.error("--min-visible must be in [0, 1]")
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    data_dir = deepforest_data_dir()
    output = args.output.resolve()
    manifest = expected_manifest(data_dir, args)
    with one_writer_at_a_time(output):
        if not args.force and outputs_match(output, manifest):
            params = json.dumps(manifest["params"])
            print(f"{output} is up to date ({params}); --force to rebuild")
            return

        print(f"Tiling deepforest images from {data_dir} into {output}")
        # A rebuild interrupted half-way must not leave a manifest that vouches for its outputs.
        (output / "manifest.json").unlink(missing_ok=True)
        files = {}
        for split, (stem, expected) in SPLITS.items():
            stats, files[split] = tile_split(
                split,
                stem,
                expected,
                data_dir,
                output,
                args.tile_size,
                args.overlap,
                args.min_visible,
            )
            print(
                f"  {split}: {stem}.png -> {stats['tiles']} tiles ({stats['empty_tiles']} without "
                f"boxes), {stats['boxes']} boxes from {stats['source_boxes']} source boxes; "
                f"{stats['clipped']} clipped at tile borders, {stats['dropped']} slivers dropped "
                f"(< {args.min_visible:g} visible), {stats['lost']} source boxes in no tile"
            )
        # Written last: its presence means every file above is complete.
        atomic_write_json(output / "manifest.json", {**manifest, "files": files})
        print(f"Done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
