"""tools/demo_figures.py: the demo's threshold by best F1, its picture and its training curve."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import demo_figures  # noqa: E402


def box(x, y, side=10):
    return [x, y, x + side, y + side]


def test_the_threshold_with_the_best_f1_is_chosen():
    # 4 crowns; true positives at scores 0.9, 0.8, 0.3 and false ones at 0.7, 0.2
    gt = [box(0, 0), box(20, 0), box(40, 0), box(60, 0)]
    preds = [box(0, 0), box(20, 1), box(100, 100), box(40, 0), box(120, 120)]
    scores = [0.9, 0.8, 0.7, 0.3, 0.2]
    best = demo_figures.best_f1_threshold([(np.array(preds), np.array(scores), gt)])
    # at 0.3: 3 of 4 predictions right, 3 of 4 crowns found (F1 0.75, above 0.67 at 0.8 or 0.2)
    assert best["threshold"] == 0.3 and best["f1"] == pytest.approx(0.75)
    assert best["precision"] == pytest.approx(0.75) and best["recall"] == pytest.approx(0.75)
    at = demo_figures.f1_at([(np.array(preds), np.array(scores), gt)], 0.8)
    assert (at["precision"], at["recall"]) == (1.0, 0.5)


def test_a_threshold_keeps_every_prediction_of_its_score():
    """Predictions of equal score pass or fail a threshold together: a true positive tied with
    false ones cannot be kept alone."""
    gt = [box(0, 0)]
    preds = np.array([box(0, 0), box(50, 50), box(80, 80), box(110, 110)])
    best = demo_figures.best_f1_threshold([(preds, np.array([0.5, 0.5, 0.5, 0.1]), gt)])
    # at 0.5: 1 of 3 right (F1 0.5), not the 1 of 1 (F1 1.0) that splitting the tie would claim
    assert best["threshold"] == 0.5 and best["f1"] == pytest.approx(0.5)
    assert demo_figures.best_f1_threshold([])["threshold"] is None


def test_a_duplicate_of_a_found_object_is_a_false_positive():
    scores, hits = demo_figures.match_detections(
        [box(0, 0), box(1, 0), box(50, 50)], [0.8, 0.9, 0.5], [box(0, 0)]
    )
    # the higher-scoring of the two overlapping boxes takes the crown
    assert hits.tolist() == [False, True, False] and scores.tolist() == [0.8, 0.9, 0.5]
    empty = demo_figures.best_f1_threshold([(np.zeros((0, 4)), np.zeros(0), [box(0, 0)])])
    assert empty["threshold"] is None and empty["f1"] == 0.0


def test_ground_truth_and_predictions_are_drawn_in_two_colours_without_text():
    image = np.zeros((60, 60, 3), dtype=np.uint8)
    canvas = demo_figures.draw_boxes(image, [box(5, 5, 20)], [box(30, 30, 20)])
    assert tuple(canvas[5, 15]) == demo_figures.GT_COLOUR  # the GT's top edge
    assert tuple(canvas[30, 40]) == demo_figures.PRED_COLOUR  # the prediction's top edge
    # inside the boxes nothing is written: no label, no score (one class)
    assert not canvas[10:24, 10:24].any() and not canvas[33:49, 33:49].any()
    assert not image.any()  # the input is left as it was
    scored = demo_figures.draw_boxes(image, [], [box(30, 30, 20)], pred_scores=[0.87])
    assert scored[33:49, 31:49].any()  # the small score, at the box's corner


def test_the_training_curve_is_drawn_from_detectron2_metrics(tmp_path):
    records = [{"iteration": i, "total_loss": 2.0 - i / 100} for i in range(0, 100, 20)]
    records += [{"iteration": 49, "bbox/AP": 3.0, "bbox/AP50": 10.0}]
    records += [{"iteration": 99, "bbox/AP": 5.0, "bbox/AP50": 18.0}]
    metrics = tmp_path / "metrics.json"
    metrics.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    demo_figures.plot_training_curve(metrics, tmp_path / "curve.png", "test")
    assert (tmp_path / "curve.png").stat().st_size > 10_000

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"iteration": 0, "bbox/AP": 1.0}) + "\n")
    with pytest.raises(ValueError, match="other.json has no total_loss"):
        demo_figures.plot_training_curve(other, tmp_path / "x.png", "test")
