"""
Fashion scenes: a synthetic multi-class detection set built from real product photos.

What DeepForest cannot exercise (several classes, objects from 8 px to a few hundred pixels spread
over P3..P7 as in COCO), this set does. Its parts:

- **real**: the objects. Each is one Fashion-MNIST photo (Zalando's 28x28 grey product images,
  10 classes, Expat licence, Debian package ``dataset-fashion-mnist``), cropped to its silhouette.
  Train scenes use the 60,000 training photos, val scenes the 10,000 test photos, so no object
  photo is in both splits.
- **synthetic**: everything else. The backgrounds are smooth random colour fields with pixel noise,
  each object is tinted with a random colour and pasted at a random place, and its box is the
  rectangle it was pasted into. Object sizes follow COCO's small / medium / large mix
  (:data:`~mimicdet.data.synthetic_coco.COCO_SIZE_MIX`), so COCOeval's AP_s/m/l are meaningful.

``tools/prepare_fashion_scenes.py`` writes the set; :func:`register_fashion_scenes` registers it.
"""

import gzip
import os
import struct
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

from .deepforest import default_datasets_root, register_coco_split
from .synthetic_coco import COCO_SIZE_MIX

__all__ = [
    "FASHION_CLASSES",
    "compose_scene",
    "default_fashion_source",
    "load_fashion_mnist",
    "read_idx",
    "register_fashion_scenes",
    "write_idx",
]

# Fashion-MNIST's label order (label k is FASHION_CLASSES[k]); COCO category ids are k + 1
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# the IDX files of each source split, as Debian's package and the upstream release name them
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
DEBIAN_SOURCE = Path("/usr/share/datasets/fashion-mnist")
_IDX_MAGIC = {2049: 1, 2051: 3}  # labels: 1-d, images: 3-d (n, rows, cols), unsigned bytes
_IDX_MAGIC_OF_NDIM = {ndim: magic for magic, ndim in _IDX_MAGIC.items()}


def default_fashion_source() -> Path:
    """Folder of Fashion-MNIST's four files: ``$MIMICDET_FASHION_MNIST`` if set (a machine without
    Debian's package, such as the GPU check's, points it at a carried copy), else Debian's."""
    env = os.environ.get("MIMICDET_FASHION_MNIST")
    return Path(env).expanduser() if env else DEBIAN_SOURCE


def read_idx(path) -> np.ndarray:
    """An IDX file (gzipped or not) of unsigned bytes as a numpy array; a clear error otherwise."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: {len(data)} bytes, too short for an IDX header")
    (magic,) = struct.unpack(">i", data[:4])
    if magic not in _IDX_MAGIC:
        raise ValueError(f"{path}: IDX magic {magic}, expected 2049 (labels) or 2051 (images)")
    ndim = _IDX_MAGIC[magic]
    shape = struct.unpack(f">{ndim}i", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape}, file holds {body.size} values")
    return body.reshape(shape)


def write_idx(path, array: np.ndarray):
    """Writes ``array`` (uint8, 1-d labels or 3-d images) as a gzipped IDX file, as Fashion-MNIST
    ships them; the gzip header carries no time stamp, so equal arrays give equal files."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim not in _IDX_MAGIC_OF_NDIM:
        raise ValueError(
            f"{path}: IDX needs uint8 labels (1-d) or images (3-d), got {array.dtype} of "
            f"shape {array.shape}"
        )
    header = struct.pack(f">i{array.ndim}i", _IDX_MAGIC_OF_NDIM[array.ndim], *array.shape)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(header + array.tobytes())


def load_fashion_mnist(source_dir, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """``(images (N, 28, 28) uint8, labels (N,) int64)`` of one source split, "train" or "test"."""
    source_dir = Path(source_dir)
    image_file, label_file = (source_dir / name for name in FASHION_FILES[split])
    for path in (image_file, label_file):
        if not path.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {path} is missing. Install Debian's package "
                f"(`apt-get install dataset-fashion-mnist`, files in {DEBIAN_SOURCE}), or pass "
                "--source (or set $MIMICDET_FASHION_MNIST to) a folder holding the four "
                "*-ubyte.gz files."
            )
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{image_file} ({images.shape}) and {label_file} ({labels.shape}) do not pair up"
        )
    if labels.size and labels.max() >= len(FASHION_CLASSES):
        raise ValueError(f"{label_file}: label {labels.max()}, expected 0..9")
    return images, labels.astype(np.int64)


def _background(rng, height, width):
    """A smooth random colour field (a 4x4 grid of colours, bicubic) with pixel noise."""
    grid = rng.randint(0, 256, size=(4, 4, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(grid).resize((width, height), Image.BICUBIC), np.float32)
    return field + rng.normal(0.0, 8.0, size=field.shape).astype(np.float32)


def _silhouette(photo):
    """The photo cropped to the bounding box of its non-black pixels (None if it has none)."""
    rows, cols = np.nonzero(photo > 16)
    if rows.size == 0:
        return None
    return photo[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def _draw_box_size(rng, aspect, max_side):
    """(w, h) with sqrt(w * h) drawn from COCO's size mix, the photo's aspect ratio (h / w)
    jittered by up to 20%, and neither side above ``max_side``."""
    shares = np.array([share for share, _, _ in COCO_SIZE_MIX])
    _, low, high = COCO_SIZE_MIX[rng.choice(len(COCO_SIZE_MIX), p=shares / shares.sum())]
    scale = np.exp(rng.uniform(np.log(low), np.log(high)))
    aspect = aspect * np.exp(rng.uniform(-0.2, 0.2))
    w, h = scale / np.sqrt(aspect), scale * np.sqrt(aspect)
    shrink = min(1.0, max_side / max(w, h))
    return max(2, int(round(w * shrink))), max(2, int(round(h * shrink)))


def _overlaps(box, boxes, max_covered):
    """True if ``box`` and any of ``boxes`` cover more than ``max_covered`` of either's area."""
    x0, y0, x1, y1 = box
    for a0, b0, a1, b1 in boxes:
        inter = max(0, min(x1, a1) - max(x0, a0)) * max(0, min(y1, b1) - max(y0, b0))
        smaller = min((x1 - x0) * (y1 - y0), (a1 - a0) * (b1 - b0))
        if inter > max_covered * smaller:
            return True
    return False


def compose_scene(
    rng: np.random.RandomState,
    photos: np.ndarray,
    labels: np.ndarray,
    image_size: Tuple[int, int] = (512, 512),
    objects: Tuple[int, int] = (2, 12),
    max_covered: float = 0.3,
    tries: int = 20,
) -> Tuple[np.ndarray, List[Dict]]:
    """
    One scene: ``(image (H, W, 3) uint8 RGB, objects)``, each object a dict with ``bbox``
    ([x0, y0, x1, y1], integers, the pasted rectangle), ``label`` (0..9) and ``photo`` (its index
    in ``photos``).

    The scene asks for a number of objects drawn uniformly from ``objects`` (inclusive). An object
    whose place would cover more than ``max_covered`` of another's box (or its own) is placed again,
    up to ``tries`` times, then left out, so boxes stay visible and labels stay true.
    """
    height, width = image_size
    image = _background(rng, height, width)
    placed: List[Dict] = []
    for _ in range(rng.randint(objects[0], objects[1] + 1)):
        index = int(rng.randint(len(photos)))
        silhouette = _silhouette(photos[index])
        if silhouette is None:
            continue
        w, h = _draw_box_size(rng, silhouette.shape[0] / silhouette.shape[1], 0.8 * min(image_size))
        for _ in range(tries):
            x0, y0 = int(rng.randint(0, width - w + 1)), int(rng.randint(0, height - h + 1))
            box = (x0, y0, x0 + w, y0 + h)
            if not _overlaps(box, [p["bbox"] for p in placed], max_covered):
                break
        else:
            continue
        grey = np.asarray(Image.fromarray(silhouette).resize((w, h), Image.BILINEAR), np.float32)
        grey = grey[..., None] / 255.0
        # a tinted photo: the shading is the photo's, the hue a random one; the alpha lets the
        # photo's black surround show the background through
        tint = rng.uniform(60, 255, size=3).astype(np.float32)
        alpha = np.clip(grey * 3.0, 0.0, 1.0)
        patch = image[y0 : y0 + h, x0 : x0 + w]
        image[y0 : y0 + h, x0 : x0 + w] = patch * (1 - alpha) + tint * (0.3 + 0.7 * grey) * alpha
        placed.append({"bbox": list(box), "label": int(labels[index]), "photo": index})
    return np.clip(image, 0, 255).astype(np.uint8), placed


def register_fashion_scenes(root=None, splits: Sequence[str] = ("train", "val")):
    """
    Registers ``fashion_scenes_train`` and ``fashion_scenes_val`` (10 classes, COCO evaluation).

    Args:
        root: folder with ``{train,val}/`` images and ``annotations/{train,val}.json``; default
            ``default_datasets_root() / "fashion_scenes"``. Nothing is read until a split is used.
    """
    root = Path(root) if root is not None else default_datasets_root() / "fashion_scenes"
    hint = "run `python tools/prepare_fashion_scenes.py` from the repository root"
    for split in splits:
        register_coco_split(
            f"fashion_scenes_{split}",
            root / "annotations" / f"{split}.json",
            root / split,
            list(FASHION_CLASSES),
            hint,
        )
