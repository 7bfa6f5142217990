"""Registers the tiled DeepForest tree-crown datasets written by ``tools/prepare_deepforest.py``."""

import os
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

__all__ = ["default_datasets_root", "register_coco_split", "register_deepforest"]

_PREPARE_HINT = "run `python tools/prepare_deepforest.py` (or `make data`) from the repository root"


def default_datasets_root():
    """Folder holding all datasets: ``$MIMICDET_DATASETS`` if set, else ``<repo>/datasets``.

    Like detectron2's ``DETECTRON2_DATASETS``, but the fallback is the repository's ``datasets/``
    (where the prepare tool writes by default) rather than the current directory, so training and
    tests find the data whatever directory they start in. Outside a source checkout it falls back
    to ``./datasets``.
    """
    env = os.environ.get("MIMICDET_DATASETS")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[4]
    if (repo / "tools" / "prepare_deepforest.py").is_file():
        return repo / "datasets"
    return Path("datasets")


def _load_split(json_file, image_root, name, hint):
    # Checked here rather than at registration so that importing mimicdet never needs the data.
    for path in (json_file, image_root):
        if not path.exists():
            raise FileNotFoundError(f"Dataset '{name}' needs {path}, which is missing: {hint}")
    return load_coco_json(str(json_file), str(image_root), name)


def register_coco_split(name, json_file, image_root, thing_classes, hint):
    """
    detectron2's ``register_coco_instances`` with a loader whose error for missing files says how
    to make them (``hint``). Registering a name again replaces it, so the call is idempotent.
    """
    json_file, image_root = Path(json_file), Path(image_root)
    # detectron2 refuses to register a name twice; replacing keeps the call idempotent.
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(
        name, lambda j=json_file, i=image_root, n=name: _load_split(j, i, n, hint)
    )
    MetadataCatalog.get(name).set(
        json_file=str(json_file),
        image_root=str(image_root),
        evaluator_type="coco",
        thing_classes=list(thing_classes),
    )


def register_deepforest(root=None):
    """Registers ``deepforest_train`` and ``deepforest_val`` (one class, "Tree", COCO evaluation).

    Args:
        root (str or Path or None): folder with ``{train,val}/`` tiles and
            ``annotations/{train,val}.json``; default ``default_datasets_root() / "deepforest"``.
            Nothing is read until the dataset is used, so the files may be created later.

    Calling it again re-registers both splits, with the new ``root`` if one is given.
    """
    root = Path(root) if root is not None else default_datasets_root() / "deepforest"
    for split in ("train", "val"):
        register_coco_split(
            f"deepforest_{split}",
            root / "annotations" / f"{split}.json",
            root / split,
            ["Tree"],
            _PREPARE_HINT,
        )
