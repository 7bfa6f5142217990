"""Checks on user-converted datasets, run once on the dataset dicts before training starts."""

import logging
import math
from numbers import Integral

import numpy as np
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager

__all__ = ["check_detection_dataset_dicts"]

logger = logging.getLogger(__name__)

# How many missing files an error lists; the total is always given.
_MAX_LISTED = 5

# What can happen to a non-crowd box besides being kept as it is, as the log describes it.
_VERDICTS = {
    "degenerate": "with zero, negative or non-finite size (dropped)",
    "clipped": "partly outside the image (clipped)",
    "outside": "entirely outside the image (dropped)",
}

# Relative modes are rejected by detectron2's own box conversion too.
_ABSOLUTE_MODES = (BoxMode.XYXY_ABS, BoxMode.XYWH_ABS, BoxMode.XYWHA_ABS)

_CONTIGUOUS_IDS_HINT = (
    "Category ids must be contiguous, 0 to num_classes - 1. For a COCO-format json, register it "
    "with detectron2's register_coco_instances (or call load_coco_json with a dataset_name), "
    "which maps any set of COCO category ids to contiguous ids; a custom loader must do the same "
    "mapping. Also check that num_classes in the config matches the dataset."
)


def check_detection_dataset_dicts(dataset_dicts, dataset_name, num_classes):
    """
    Validates the records of one detection dataset and returns a cleaned copy, so that a badly
    converted dataset fails here, with a message naming the file at fault, rather than deep inside
    the data loader or the model hours later. Call it on the dicts of each training dataset
    (e.g. ``DatasetCatalog.get(name)``) before the train loader is built.

    Rules, in the order they are applied:

    1. An empty list raises ``ValueError``.
    2. Records whose ``file_name`` does not exist raise ``FileNotFoundError``, listing the first
       few missing files and their total count, so that one run reveals the extent of the damage.
    3. A non-crowd annotation without ``category_id``, without an absolute ``bbox_mode`` or with
       a ``bbox`` of the wrong length raises ``ValueError``: the mapper would fail on it anyway,
       with a message that does not say which file is at fault.
    4. ``category_id`` must be an integer in ``[0, num_classes)``, else ``ValueError``. It is
       never remapped here: a silent remapping could pair the wrong names with the classes.
    5. Boxes are compared in ``XYXY_ABS`` (converted with ``BoxMode``, as detectron2's mapper
       does). Boxes with zero, negative or non-finite width or height are dropped: they carry no
       object, and the box regression loss is undefined for them.
    6. When the record has ``height`` and ``width``, boxes partly outside the image are clipped
       to it (and stored in ``XYXY_ABS``), and boxes entirely outside it are dropped. Without the
       image size these are left to the mapper, which clips after its transforms. Rotated
       (``XYWHA_ABS``) boxes are judged by their enclosing box, which is what the mapper turns
       them into, and a clipped one is stored as that box.
    7. Crowd annotations (``iscrowd=1``) are left untouched: detectron2's mapper drops them before
       the model sees them, and COCO evaluation wants them as annotated.
    8. Images with no annotations, including those whose every box was dropped, are kept: they are
       legitimate background images, and ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` decides whether
       they are used.

    Every drop and clip is counted in one summary log line; the first box of each kind is logged
    as an example with its file name. The input is not modified.

    Args:
        dataset_dicts (list[dict]): records in detectron2's standard dataset format.
        dataset_name (str): the registered name, used in messages.
        num_classes (int): number of foreground classes the model predicts.

    Returns:
        list[dict]: new records (shallow copies) with the cleaned ``annotations``.
    """
    if len(dataset_dicts) == 0:
        raise ValueError(
            f"Dataset '{dataset_name}' has no images. Check that it is registered with the right "
            "json file and image folder, and that the json lists images."
        )

    missing = [r["file_name"] for r in dataset_dicts if not PathManager.isfile(r["file_name"])]
    if missing:
        listed = "\n  ".join(missing[:_MAX_LISTED])
        more = ""
        if len(missing) > _MAX_LISTED:
            more = f"\n  ... and {len(missing) - _MAX_LISTED} more"
        raise FileNotFoundError(
            f"Dataset '{dataset_name}': {len(missing)} of {len(dataset_dicts)} image files do not "
            f"exist:\n  {listed}{more}\nCheck the image root the dataset was registered with."
        )

    # Validate every annotation first, then judge all boxes at once: converting them one at a
    # time with BoxMode takes about a minute on a COCO-sized dataset.
    boxes, modes, limits = [], [], []
    for record in dataset_dicts:
        # Without the image size there is nothing to clip to; the mapper clips after transforms.
        if "height" in record and "width" in record:
            low, high = (0.0, 0.0), (float(record["width"]), float(record["height"]))
        else:
            low, high = (-math.inf, -math.inf), (math.inf, math.inf)
        for index, anno in enumerate(record.get("annotations", [])):
            if anno.get("iscrowd", 0) == 0:
                modes.append(_validate_annotation(anno, record, index, dataset_name, num_classes))
                boxes.append(anno["bbox"])
                limits.append(low + low + high + high)
    verdicts, clipped_boxes = _judge_boxes(boxes, modes, np.asarray(limits).reshape(-1, 2, 4))

    counts = {verdict: 0 for verdict in _VERDICTS}
    examples = {}
    num_background = 0
    cleaned = []
    k = 0  # index into the non-crowd boxes, which are visited in the same order as above
    for record in dataset_dicts:
        record = dict(record)
        if "annotations" in record:
            kept = []
            for anno in record["annotations"]:
                if anno.get("iscrowd", 0) == 0:
                    verdict = verdicts[k]
                    if verdict != "kept":
                        counts[verdict] += 1
                        examples.setdefault(verdict, (record["file_name"], anno["bbox"]))
                    if verdict == "clipped":
                        anno = dict(anno, bbox=clipped_boxes[k], bbox_mode=BoxMode.XYXY_ABS)
                    k += 1
                    if verdict in ("degenerate", "outside"):
                        continue
                kept.append(anno)
            record["annotations"] = kept
        if not any(a.get("iscrowd", 0) == 0 for a in record.get("annotations", [])):
            num_background += 1
        cleaned.append(record)

    for verdict, (file_name, bbox) in examples.items():
        logger.warning(
            f"Dataset '{dataset_name}': {counts[verdict]} boxes {_VERDICTS[verdict]}, "
            f"e.g. {list(bbox)} in {file_name}"
        )
    logger.info(
        f"Dataset '{dataset_name}': checked {len(cleaned)} images and {len(boxes)} non-crowd "
        f"boxes; dropped {counts['degenerate']} with zero or negative size, clipped "
        f"{counts['clipped']} and dropped {counts['outside']} outside the image; "
        f"{num_background} images have no boxes (kept)."
    )
    return cleaned


def _validate_annotation(anno, record, index, dataset_name, num_classes):
    """Raises ValueError for a malformed non-crowd annotation; returns its ``BoxMode``."""
    where = f"Dataset '{dataset_name}', {record['file_name']}, annotation {index}"
    if "category_id" not in anno:
        raise ValueError(f"{where} has no 'category_id'.")
    category_id = anno["category_id"]
    # bool is an Integral too, and never a meaningful class.
    if not isinstance(category_id, Integral) or isinstance(category_id, bool):
        raise ValueError(
            f"{where} has category_id {category_id!r} of type {type(category_id).__name__}; "
            f"expected an int in [0, {num_classes}). {_CONTIGUOUS_IDS_HINT}"
        )
    if not 0 <= category_id < num_classes:
        raise ValueError(
            f"{where} has category_id {category_id}, outside [0, {num_classes}). "
            f"{_CONTIGUOUS_IDS_HINT}"
        )
    try:
        mode = BoxMode(anno["bbox_mode"])
    except (KeyError, ValueError):
        raise ValueError(
            f"{where} needs a 'bbox_mode' that is a detectron2 BoxMode, got "
            f"{anno.get('bbox_mode')!r}."
        ) from None
    if mode not in _ABSOLUTE_MODES:
        raise ValueError(f"{where} has bbox_mode {mode.name}; detectron2 needs absolute boxes.")
    num_values = 5 if mode == BoxMode.XYWHA_ABS else 4
    if len(anno.get("bbox", ())) != num_values:
        raise ValueError(
            f"{where} needs a 'bbox' with {num_values} values for {mode.name}, "
            f"got {anno.get('bbox')!r}."
        )
    return mode


def _judge_boxes(boxes, modes, limits):
    """
    Args:
        boxes (list): N boxes, each in its own mode from ``modes`` (list[BoxMode]).
        limits (ndarray): (N, 2, 4) lowest and highest allowed XYXY coordinates of each box.

    Returns:
        list[str]: per box, "kept" or a key of ``_VERDICTS``.
        list[list[float] or None]: the XYXY_ABS box clipped to its limits, where it was clipped.
    """
    xyxy = np.zeros((len(boxes), 4))
    modes = np.asarray(modes, dtype=np.int64)
    for mode in _ABSOLUTE_MODES:
        (selected,) = np.nonzero(modes == mode)
        if len(selected):
            group = np.asarray([boxes[i] for i in selected], dtype=np.float64)
            xyxy[selected] = BoxMode.convert(group, mode, BoxMode.XYXY_ABS)
    clipped = np.minimum(np.maximum(xyxy, limits[:, 0]), limits[:, 1])

    def has_area(b):
        return np.isfinite(b).all(axis=1) & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])

    degenerate = ~has_area(xyxy)
    outside = ~degenerate & ~has_area(clipped)
    was_clipped = ~degenerate & ~outside & (clipped != xyxy).any(axis=1)
    verdicts = np.full(len(boxes), "kept", dtype=object)
    verdicts[degenerate] = "degenerate"
    verdicts[outside] = "outside"
    verdicts[was_clipped] = "clipped"
    return verdicts.tolist(), [b.tolist() if c else None for b, c in zip(clipped, was_clipped)]
