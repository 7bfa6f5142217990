"""tools/analyze_detections.py: the AP50 split into box quality and ranking, on made-up results."""

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import analyze_detections  # noqa: E402

# two images, three boxes each (xywh), well apart
GT_BOXES = {
    1: [[10, 10, 40, 40], [100, 20, 30, 50], [200, 200, 60, 40]],
    2: [[50, 50, 20, 20], [150, 100, 40, 40], [20, 200, 50, 50]],
}


def write_gt(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": 300, "height": 300} for i in GT_BOXES]
    annotations = [
        {
            "id": 10 * i + k,
            "image_id": i,
            "category_id": 1,
            "bbox": b,
            "area": b[2] * b[3],
            "iscrowd": 0,
        }
        for i, boxes in GT_BOXES.items()
        for k, b in enumerate(boxes)
    ]
    gt = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "Tree"}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return path


def scaled(box, factor):
    x, y, w, h = box
    cx, cy = x + w / 2, y + h / 2
    return [cx - w * factor / 2, cy - h * factor / 2, w * factor, h * factor]


def run(tmp_path, detections):
    results = tmp_path / "coco_instances_results.json"
    results.write_text(json.dumps(detections))
    out = tmp_path / "report.json"
    analyze_detections.main(
        [str(results), "--gt-json", str(write_gt(tmp_path)), "--output", str(out)]
    )
    return json.loads(out.read_text())


def test_exact_boxes_ranked_below_false_positives(tmp_path):
    # every ground-truth box found exactly, but every one scored below a false positive
    detections = []
    for image_id, boxes in GT_BOXES.items():
        for box in boxes:
            detections.append({"image_id": image_id, "category_id": 1, "bbox": box, "score": 0.1})
            far = [box[0] + 5, 280, 10, 10]  # overlaps no ground-truth box
            detections.append({"image_id": image_id, "category_id": 1, "bbox": far, "score": 0.9})
    report = run(tmp_path, detections)
    assert report["AP50"] < 60  # precision is at most 1/2 at every recall
    assert report["AP50_iou_ranked"] == pytest.approx(100.0)
    assert report["max_recall50"] == pytest.approx(100.0)
    # the top six by score are the false positives
    assert report["top_best_iou_histogram"]["0.00-0.10"] == 6
    assert "matched" not in report


def test_oversized_boxes_measured_as_a_size_error(tmp_path):
    factor = 1.2
    detections = [
        {"image_id": image_id, "category_id": 1, "bbox": scaled(box, factor), "score": 0.5}
        for image_id, boxes in GT_BOXES.items()
        for box in boxes
    ]
    report = run(tmp_path, detections)
    matched = report["matched"]
    assert matched["count"] == 6
    assert matched["mean_iou"] == pytest.approx(1 / factor**2, rel=1e-4)
    assert matched["log_size_ratio_mean"] == pytest.approx([math.log(factor)] * 2, rel=1e-4)
    assert matched["log_size_ratio_std"] == pytest.approx([0, 0], abs=1e-6)
    assert matched["centre_error_mean"] == pytest.approx([0, 0], abs=1e-6)
    # IoU 0.69: matched at 0.5, none in the top bin
    assert report["top_best_iou_histogram"]["0.50-0.75"] == 6
    assert report["AP50"] == pytest.approx(100.0)


def test_empty_results_are_a_clear_error(tmp_path):
    results = tmp_path / "coco_instances_results.json"
    results.write_text("[]")
    with pytest.raises(SystemExit, match="holds no detections"):
        analyze_detections.main([str(results), "--gt-json", str(write_gt(tmp_path))])


def test_results_of_another_dataset_are_refused(tmp_path):
    results = tmp_path / "coco_instances_results.json"
    det = {"image_id": 99, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0}
    results.write_text(json.dumps([det]))
    with pytest.raises(SystemExit, match="1 image ids are not in"):
        analyze_detections.main([str(results), "--gt-json", str(write_gt(tmp_path))])


def test_ground_truth_of_a_registered_dataset():
    assert analyze_detections.gt_json_of("deepforest_val").endswith("annotations/val.json")
    with pytest.raises(SystemExit, match="no json_file"):
        analyze_detections.gt_json_of("not_a_registered_dataset")
