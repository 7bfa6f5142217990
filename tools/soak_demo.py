#!/usr/bin/env python
"""
Soak test of ``tools/demo.py``: run its prediction loop over a folder of several hundred images and
report how the process's resident memory (RSS) grows after a warm-up. A leak (kept tensors,
growing caches, figures never closed) shows as steady growth; the target is under 5%.

    python tools/soak_demo.py --config-file configs/DeepForest/mimicdet_MNV2_FPN.yaml \\
        --opts MODEL.WEIGHTS output/demo/model_deploy.pth

Without ``--input`` it writes ``--num-images`` images (default 300) to a temporary folder: the
DeepForest val tiles, cycled with flips and crops so that the sizes vary, when they are prepared,
else random pixels. Prints one line and writes ``--json`` if given.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from detectron2.data import MetadataCatalog
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import Predictor, list_images, predict_folder  # noqa: E402


def rss_mib():
    """This process's resident memory now, in MiB (Linux ``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def write_images(folder, num_images, sources=None, random_sizes=(200, 400), seed=0):
    """
    ``num_images`` PNGs in ``folder``: the ``sources`` images (default: the DeepForest val tiles,
    where ``import mimicdet`` registered them, when prepared) flipped and cropped to varied sizes, or, without sources, random pixels with
    sides drawn from ``random_sizes``. Returns their paths.
    """
    rng = np.random.default_rng(seed)
    if sources is None:
        val_tiles = Path(MetadataCatalog.get("deepforest_val").image_root)
        sources = sorted(val_tiles.glob("*.png")) if val_tiles.is_dir() else []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num_images):
        if sources:
            pixels = np.asarray(Image.open(sources[i % len(sources)]).convert("RGB"))
            if rng.random() < 0.5:
                pixels = pixels[:, ::-1]
            height, width = pixels.shape[:2]
            h, w = rng.integers(height // 2, height + 1), rng.integers(width // 2, width + 1)
            y, x = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
            pixels = pixels[y : y + h, x : x + w]
        else:
            h, w = rng.integers(random_sizes[0], random_sizes[1] + 1, size=2)
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        path = folder / f"soak_{i:04d}.png"
        Image.fromarray(np.ascontiguousarray(pixels)).save(path)
        paths.append(path)
    return paths


def soak(predictor, paths, output, warmup, confidence_threshold=0.3):
    """
    Runs the demo loop over ``paths``; returns RSS after ``warmup`` images, the peak RSS over the
    rest and the growth from one to the other, in MiB and percent.
    """
    if len(paths) <= warmup:
        raise ValueError(f"{len(paths)} images: need more than --warmup {warmup}")
    baseline, peak, start = None, 0.0, time.perf_counter()
    for i, _ in enumerate(predict_folder(predictor, paths, output, confidence_threshold)):
        rss = rss_mib()
        if i + 1 == warmup:
            baseline = rss
        elif baseline is not None:
            peak = max(peak, rss)
    return {
        "images": len(paths),
        "warmup": warmup,
        "rss_after_warmup_mib": round(baseline, 1),
        "peak_rss_mib": round(peak, 1),
        "growth_mib": round(peak - baseline, 1),
        "growth_percent": round(100 * (peak - baseline) / baseline, 2),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="a yaml or LazyConfig .py config")
    parser.add_argument("--input", nargs="+", help="images and/or folders (default: generated)")
    parser.add_argument("--num-images", type=int, default=300, help="images to generate")
    parser.add_argument("--warmup", type=int, default=20, help="images before the baseline RSS")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="as tools/demo.py")
    args = parser.parse_args(argv)

    predictor = Predictor(args.config_file, args.opts)
    with tempfile.TemporaryDirectory(prefix="mimicdet_soak_") as tmp:
        if args.input:
            paths = list_images(args.input)
        else:
            paths = write_images(Path(tmp) / "images", args.num_images)
        result = soak(predictor, paths, Path(tmp) / "pictures", args.warmup)
    result["config"] = args.config_file
    print(
        f"{result['images']} images in {result['seconds']} s: RSS {result['rss_after_warmup_mib']}"
        f" MiB after {args.warmup} images, peak {result['peak_rss_mib']} MiB afterwards "
        f"(+{result['growth_percent']}%)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
