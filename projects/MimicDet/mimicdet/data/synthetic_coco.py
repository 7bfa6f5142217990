"""
Boxes and images with COCO's object-size mix, made on the spot: the COCO path (level assignment,
sampling, a training step at 800x1333) can be checked without COCO itself.
"""

import json
import os
from typing import Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

__all__ = ["COCO_SIZE_MIX", "coco_like_boxes", "register_synthetic_coco", "write_synthetic_coco"]

# COCO's share of small (area < 32^2), medium (< 96^2) and large instances, with the range of
# sqrt(area) each is drawn from (log-uniform); the largest boxes span most of the image
COCO_SIZE_MIX = (
    (0.41, 8.0, 32.0),
    (0.34, 32.0, 96.0),
    (0.25, 96.0, 640.0),
)


def coco_like_boxes(
    num_boxes: int, image_size: Tuple[int, int] = (800, 1333), seed: int = 0
) -> np.ndarray:
    """
    ``(num_boxes, 4)`` float32 XYXY boxes inside an image of ``(height, width)``: sizes drawn
    with :data:`COCO_SIZE_MIX`, aspect ratios log-uniform in [1/3, 3], positions uniform.
    """
    rng = np.random.RandomState(seed)
    height, width = image_size
    shares = np.array([share for share, _, _ in COCO_SIZE_MIX])
    bins = rng.choice(len(COCO_SIZE_MIX), size=num_boxes, p=shares / shares.sum())
    low = np.log([COCO_SIZE_MIX[b][1] for b in bins])
    high = np.log([COCO_SIZE_MIX[b][2] for b in bins])
    scale = np.exp(rng.uniform(low, high))
    aspect = np.exp(rng.uniform(np.log(1 / 3), np.log(3), size=num_boxes))  # h / w
    w = np.minimum(scale / np.sqrt(aspect), width - 1)
    h = np.minimum(scale * np.sqrt(aspect), height - 1)
    x0 = rng.uniform(0, width - w)
    y0 = rng.uniform(0, height - h)
    return np.stack([x0, y0, x0 + w, y0 + h], axis=1).astype(np.float32)


def write_synthetic_coco(
    root: str,
    num_images: int = 4,
    boxes_per_image: int = 20,
    image_size: Tuple[int, int] = (800, 1333),
    num_classes: int = 80,
    seed: int = 0,
) -> Tuple[str, str]:
    """
    Noise images, each with ``boxes_per_image`` :func:`coco_like_boxes` painted as flat
    rectangles whose colour encodes their class, and their COCO json under ``root``.

    Returns:
        the json path and the image folder.
    """
    import cv2

    rng = np.random.RandomState(seed)
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    height, width = image_size
    colours = rng.randint(60, 256, size=(num_classes, 3))
    images, annotations = [], []
    for i in range(num_images):
        image = rng.randint(0, 60, (height, width, 3)).astype(np.uint8)
        boxes = coco_like_boxes(boxes_per_image, image_size, seed=seed * 1000 + i)
        classes = rng.randint(0, num_classes, size=len(boxes))
        # largest first, so that small boxes stay visible on top of large ones
        for box, c in sorted(zip(boxes, classes), key=lambda bc: -(bc[0][2] - bc[0][0])):
            x0, y0, x1, y1 = box.round().astype(int)
            image[y0:y1, x0:x1] = colours[c]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": int(c) + 1,
                    "bbox": [
                        float(box[0]),
                        float(box[1]),
                        float(box[2] - box[0]),
                        float(box[3] - box[1]),
                    ],
                    "area": float((box[2] - box[0]) * (box[3] - box[1])),
                    "iscrowd": 0,
                }
            )
        cv2.imwrite(os.path.join(image_dir, f"{i}.png"), image)
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": height, "width": width})
    categories = [{"id": c + 1, "name": f"class{c}"} for c in range(num_classes)]
    json_file = os.path.join(root, "coco.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return json_file, image_dir


def register_synthetic_coco(name: str, root: str, **kwargs) -> str:
    """:func:`write_synthetic_coco` under ``root`` and register it as ``name`` (replacing one)."""
    json_file, image_dir = write_synthetic_coco(root, **kwargs)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, json_file, image_dir)
    return name
