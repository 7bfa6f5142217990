#!/usr/bin/env python
"""Compose the Fashion scenes detection set (10 classes, COCO-like object sizes) from Fashion-MNIST.

The object photos are real (Fashion-MNIST, Debian's ``dataset-fashion-mnist``: train scenes from
its 60,000 training photos, val scenes from its 10,000 test photos); the scenes are synthetic
(random colour backgrounds, tinted and pasted photos, boxes = pasted rectangles). See
``mimicdet/data/fashion_scenes.py``.

    apt-get install dataset-fashion-mnist          # the source, once (root)
    python tools/prepare_fashion_scenes.py         # -> datasets/fashion_scenes (seconds)
    python tools/prepare_fashion_scenes.py --photo-subset DIR   # also: the photos they use

``--photo-subset DIR`` writes Fashion-MNIST's four files again with every photo that the scenes
never read made black, all labels kept: ``--source DIR`` then composes the very same scenes, from
3 MiB instead of 30 (how ``tools/gpu_check.sh`` carries the set to a machine without the package).

Output layout::

    <output>/train/*.jpg  <output>/val/*.jpg
    <output>/annotations/train.json  <output>/annotations/val.json
    <output>/manifest.json   (parameters + source hashes; a matching manifest makes reruns a no-op)
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mimicdet.data.fashion_scenes import (
    FASHION_CLASSES,
    FASHION_FILES,
    compose_scene,
    default_fashion_source,
    load_fashion_mnist,
    write_idx,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tools"))

from prepare_deepforest import (  # noqa: E402
    atomic_write,
    atomic_write_json,
    one_writer_at_a_time,
    outputs_match,
    remove_stale,
    sha256,
)

# Bump when the output format or the composition changes so that old outputs are regenerated.
FORMAT_VERSION = 1
# scene split -> (Fashion-MNIST split its photos come from, seed offset)
SPLITS = {"train": ("train", 0), "val": ("test", 1)}


class PhotoReads:
    """A split's photos as :func:`compose_scene` sees them, noting the index of every photo it
    reads (a photo drawn and then left out counts: it was read, and it steered the random draws)."""

    def __init__(self, photos):
        self.photos, self.read = photos, set()

    def __len__(self):
        return len(self.photos)

    def __getitem__(self, index):
        self.read.add(int(index))
        return self.photos[index]


def write_photo_subset(folder, data, reads):
    """Fashion-MNIST's four files in ``folder``, every photo not in ``reads[split]`` black."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, (photos, labels) in data.items():
        kept = np.zeros_like(photos)
        index = np.fromiter(sorted(reads[split]), dtype=np.int64)
        kept[index] = photos[index]
        image_file, label_file = FASHION_FILES[split]
        write_idx(folder / image_file, kept)
        write_idx(folder / label_file, labels.astype(np.uint8))
        print(f"  photo subset: {len(index)} of {len(photos)} {split} photos -> {folder}")


def write_split(split, photos, labels, output, count, image_size, seed):
    """Composes ``count`` scenes into ``output/<split>`` and their COCO json; returns stats."""
    rng = np.random.RandomState(seed)
    split_dir = output / split
    split_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        image, objects = compose_scene(rng, photos, labels, image_size)
        file_name = f"{split}_{image_id:05d}.jpg"
        atomic_write(
            split_dir / file_name,
            lambda tmp: Image.fromarray(image).save(tmp, format="JPEG", quality=95),
        )
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "height": image_size[0],
                "width": image_size[1],
            }
        )
        for obj in objects:
            x0, y0, x1, y1 = obj["bbox"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": obj["label"] + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                    # index of the Fashion-MNIST photo, for tracing a box back to its source
                    "source_photo": obj["photo"],
                }
            )
    written = {im["file_name"] for im in images}
    remove_stale(split_dir, "*.jpg", written)  # scenes of an earlier, larger run
    coco = {
        "info": {"description": f"fashion scenes ({split}), synthetic scenes of Fashion-MNIST"},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": name, "supercategory": "fashion"}
            for k, name in enumerate(FASHION_CLASSES)
        ],
    }
    atomic_write_json(output / "annotations" / f"{split}.json", coco)
    areas = np.array([a["area"] for a in annotations], dtype=np.float64)
    return {
        "images": len(images),
        "boxes": len(annotations),
        "small": int((areas < 32**2).sum()),
        "medium": int(((areas >= 32**2) & (areas < 96**2)).sum()),
        "large": int((areas >= 96**2).sum()),
        "files": sorted(written),
    }


def expected_manifest(source, args):
    sources = {name: sha256(source / name) for files in FASHION_FILES.values() for name in files}
    params = {
        "train_images": args.train_images,
        "val_images": args.val_images,
        "image_size": args.image_size,
        "seed": args.seed,
    }
    return {"format_version": FORMAT_VERSION, "params": params, "sources": sources}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--source",
        type=Path,
        default=default_fashion_source(),
        help="folder with Fashion-MNIST's four *-ubyte.gz files (default: $MIMICDET_FASHION_MNIST "
        f"if set, else Debian's {default_fashion_source()})",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=REPO_ROOT / "datasets" / "fashion_scenes",
        help="dataset folder (default: <repo>/datasets/fashion_scenes)",
    )
    # 800 scenes of ~6.5 objects: ~5,000 training boxes, 500 per class
    parser.add_argument("--train-images", type=int, default=800)
    # 100 scenes: ~650 val boxes; a periodic evaluation costs ~15 s on the 2-core CPU
    parser.add_argument("--val-images", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=512, help="square scene side, pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if outputs match")
    parser.add_argument(
        "--photo-subset",
        type=Path,
        help="also write the source files again into this folder, the photos the scenes never "
        "read made black (composes the scenes even if outputs match)",
    )
    args = parser.parse_args(argv)
    for key in ("train_images", "val_images"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.image_size < 64:
        parser.error("--image-size must be at least 64")
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    source, output = args.source.resolve(), args.output.resolve()
    # load first: a missing source fails with its install hint before anything is written
    data = {split: load_fashion_mnist(source, src) for split, (src, _) in SPLITS.items()}
    manifest = expected_manifest(source, args)
    if args.photo_subset is not None and args.photo_subset.resolve() == source:
        raise SystemExit(f"--photo-subset {args.photo_subset} is the --source: it would be lost")
    with one_writer_at_a_time(output):
        if args.photo_subset is None and not args.force and outputs_match(output, manifest, SPLITS):
            print(f"{output} is up to date ({json.dumps(manifest['params'])}); --force to rebuild")
            return
        print(f"Composing fashion scenes from {source} into {output}")
        # a rebuild interrupted half-way must not leave a manifest that vouches for its outputs
        (output / "manifest.json").unlink(missing_ok=True)
        files = {}
        counts = {"train": args.train_images, "val": args.val_images}
        reads = {}
        for split, (src, seed_offset) in SPLITS.items():
            photos, labels = data[split]
            reads[src] = PhotoReads(photos)
            stats = write_split(
                split,
                reads[src],
                labels,
                output,
                counts[split],
                (args.image_size, args.image_size),
                args.seed * len(SPLITS) + seed_offset,
            )
            files[split] = stats.pop("files")
            print(
                f"  {split}: {stats['images']} scenes of Fashion-MNIST {src} photos, "
                f"{stats['boxes']} boxes ({stats['small']} small, {stats['medium']} medium, "
                f"{stats['large']} large)"
            )
        atomic_write_json(output / "manifest.json", {**manifest, "files": files})
        if args.photo_subset is not None:
            # keyed by Fashion-MNIST's split, whose file names the subset keeps
            sources = {src: data[split] for split, (src, _) in SPLITS.items()}
            write_photo_subset(args.photo_subset, sources, {src: reads[src].read for src in reads})
        print(f"Done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
