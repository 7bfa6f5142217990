"""
The pictures `make demo` writes: predictions beside the ground truth on val tiles, at the score
threshold with the best F1 on val, and the training curve (loss and periodic AP).

    from demo_figures import best_f1_threshold, val_picture, plot_training_curve
"""

import json
from pathlib import Path

import numpy as np

# BGR, as OpenCV draws: ground truth green, predictions orange
GT_COLOUR = (80, 200, 60)
PRED_COLOUR = (0, 140, 255)


def match_detections(pred_boxes, pred_scores, gt_boxes, iou_threshold=0.5):
    """
    Greedy matching of one image's predictions to its ground truth, best score first, as
    COCO's evaluation does: a prediction is a true positive if its best still-unmatched GT has
    IoU >= ``iou_threshold``. Returns ``(scores, is_true_positive)`` as numpy arrays.
    """
    import torch
    from detectron2.structures import Boxes, pairwise_iou

    scores = np.asarray(pred_scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    hits = np.zeros(len(scores), dtype=bool)
    if len(gt_boxes) and len(scores):
        ious = pairwise_iou(
            Boxes(torch.as_tensor(np.asarray(pred_boxes, dtype=np.float32))),
            Boxes(torch.as_tensor(np.asarray(gt_boxes, dtype=np.float32))),
        ).numpy()
        free = np.ones(len(gt_boxes), dtype=bool)
        for i in order:
            candidates = np.where(free, ious[i], -1.0)
            best = int(candidates.argmax())
            if candidates[best] >= iou_threshold:
                hits[i], free[best] = True, False
    return scores, hits


def _match_all(images, iou_threshold):
    """Every prediction's score and whether it is a true positive, over all of ``images``, and
    the number of ground-truth boxes."""
    scores, hits, num_gt = [np.zeros(0)], [np.zeros(0, dtype=bool)], 0
    for pred_boxes, pred_scores, gt_boxes in images:
        s, h = match_detections(pred_boxes, pred_scores, gt_boxes, iou_threshold)
        scores.append(s)
        hits.append(h)
        num_gt += len(gt_boxes)
    return np.concatenate(scores), np.concatenate(hits), num_gt


def best_f1_threshold(images, iou_threshold=0.5):
    """
    The score threshold with the best F1 over ``images``, each a ``(pred_boxes, pred_scores,
    gt_boxes)`` triple (XYXY pixels). Returns a dict with ``threshold``, ``f1``, ``precision``,
    ``recall``, ``num_gt``; threshold None if nothing was predicted.
    """
    scores, hits, num_gt = _match_all(images, iou_threshold)
    if not len(scores) or not num_gt:
        return {"threshold": None, "f1": 0.0, "precision": 0.0, "recall": 0.0, "num_gt": num_gt}
    order = np.argsort(-scores, kind="stable")
    scores, hits = scores[order], hits[order]
    true_pos = np.cumsum(hits)
    precision = true_pos / np.arange(1, len(scores) + 1)
    recall = true_pos / num_gt
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    # a threshold keeps every prediction scoring at least it: only the last of equal scores counts
    last_of_score = np.append(scores[1:] != scores[:-1], True)
    best = int(np.argmax(np.where(last_of_score, f1, -1.0)))
    return {
        "threshold": float(scores[best]),
        "f1": float(f1[best]),
        "precision": float(precision[best]),
        "recall": float(recall[best]),
        "num_gt": num_gt,
    }


def f1_at(images, threshold, iou_threshold=0.5):
    """F1, precision and recall over ``images`` (as :func:`best_f1_threshold`) keeping the
    predictions that score at least ``threshold``."""
    scores, hits, num_gt = _match_all(images, iou_threshold)
    kept = scores >= threshold
    true_pos, predicted = int(hits[kept].sum()), int(kept.sum())
    precision, recall = true_pos / max(predicted, 1), true_pos / max(num_gt, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"threshold": threshold, "f1": f1, "precision": precision, "recall": recall,
            "num_gt": num_gt}  # fmt: skip


def draw_boxes(image_bgr, gt_boxes, pred_boxes, pred_scores=None, pred_labels=None):
    """
    The image (BGR) with ground truth and predictions as thin boxes in two colours. No text
    unless given: ``pred_labels`` (class names, for several classes) and/or the scores, in small
    print at the box's corner.
    """
    import cv2

    canvas = np.ascontiguousarray(image_bgr.copy())
    for boxes, colour in ((gt_boxes, GT_COLOUR), (pred_boxes, PRED_COLOUR)):
        for x1, y1, x2, y2 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
            cv2.rectangle(canvas, (round(x1), round(y1)), (round(x2), round(y2)), colour, 1)
    for i, (x1, y1, _, _) in enumerate(np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)):
        parts = [] if pred_labels is None else [str(pred_labels[i])]
        parts += [] if pred_scores is None else [f"{pred_scores[i]:.2f}"]
        if parts:
            cv2.putText(canvas, " ".join(parts), (round(x1) + 1, round(y1) + 9),
                        cv2.FONT_HERSHEY_PLAIN, 0.6, PRED_COLOUR, 1, cv2.LINE_AA)  # fmt: skip
    return canvas


def val_picture(panels, out_file, caption):
    """Saves the BGR ``panels`` side by side under a caption line."""
    import cv2

    height = max(p.shape[0] for p in panels)
    panels = [np.pad(p, ((0, height - p.shape[0]), (0, 4), (0, 0)), constant_values=255)
              for p in panels]  # fmt: skip
    row = np.concatenate(panels, axis=1)
    header = np.full((22, row.shape[1], 3), 255, dtype=np.uint8)
    cv2.putText(header, caption, (4, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                cv2.LINE_AA)  # fmt: skip
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out_file), np.concatenate([header, row], axis=0)):
        raise OSError(f"could not write {out_file}")


def plot_training_curve(metrics_file, out_file, title):
    """Loss (left axis) and every evaluation's AP and AP50 (right axis) against the iteration,
    from detectron2's metrics.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses, aps = [], []
    for line in Path(metrics_file).read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if "total_loss" in record:
            losses.append((record["iteration"] + 1, record["total_loss"]))
        if "bbox/AP" in record:
            aps.append((record["iteration"] + 1, record["bbox/AP"], record.get("bbox/AP50")))
    if not losses:
        raise ValueError(f"{metrics_file} has no total_loss: not a detectron2 training's metrics")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*losses), color="tab:blue", label="total loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("total loss", color="tab:blue")
    ax.grid(alpha=0.3)
    if aps:
        iters, ap, ap50 = zip(*aps)
        ap_ax = ax.twinx()
        ap_ax.plot(iters, ap, "o-", color="tab:orange", label="AP")
        ap_ax.plot(iters, ap50, "s--", color="tab:red", label="AP50")
        ap_ax.set_ylabel("val AP / AP50 (COCOEvaluator)")
        ap_ax.legend(loc="center right", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)
