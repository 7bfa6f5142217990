#!/usr/bin/env python
"""
Split a detector's COCO AP50 into what its boxes allow and what its scores lose, from the
``coco_instances_results.json`` that detectron2's ``COCOEvaluator`` writes:

- AP50 as evaluated, and the maximum recall at IoU 0.5 (COCO's 100 detections per image);
- AP50 with every score replaced by the detection's IoU with its best ground-truth box: the
  same boxes, ranked as well as their localization allows. A low figure here means the boxes
  are the limit, not the classifier;
- how the boxes miss: the best-IoU histogram of the top detections (as many as there are
  ground-truth boxes), and for those matched at IoU >= 0.3 the spread of their size (log ratio)
  and centre errors (in ground-truth widths / heights).

    python tools/analyze_detections.py output/demo/inference/coco_instances_results.json \\
        --dataset deepforest_val
"""

import argparse
import contextlib
import io
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

IOU_BINS = (0.0, 0.1, 0.3, 0.5, 0.75, 1.0)
MATCH_IOU = 0.3


def load_detections(path):
    """The detections list of a ``coco_instances_results.json``, with a clear error if empty."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: give COCOEvaluator's coco_instances_results.json")
    with open(path) as f:
        detections = json.load(f)
    if not isinstance(detections, list) or not detections:
        raise SystemExit(f"{path} holds no detections: there is nothing to analyze")
    missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in detections[0]]
    if missing:
        raise SystemExit(f"{path}: the detections lack {missing}; is it a COCO results file?")
    return detections


def gt_json_of(dataset):
    """The COCO json file behind a registered detectron2 dataset."""
    from detectron2.data import MetadataCatalog

    import mimicdet  # noqa: F401 registers the DeepForest datasets

    json_file = MetadataCatalog.get(dataset).get("json_file")
    if json_file is None:
        raise SystemExit(f"dataset {dataset!r} has no json_file in its metadata: pass --gt-json")
    return json_file


def coco_ap50(coco_gt, detections):
    """(AP50, max recall at IoU 0.5 with 100 detections per image), both in percent."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        evaluation = COCOeval(coco_gt, coco_gt.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
    # precision: [IoU threshold, recall, category, area range, max dets]; index 0 is IoU 0.5,
    # area "all" and 100 detections are the last entries, as COCOeval.summarize reads them
    precision = evaluation.eval["precision"][0, :, :, 0, -1]
    recall = evaluation.eval["recall"][0, :, 0, -1]
    ap50 = precision[precision > -1].mean() if (precision > -1).any() else 0.0
    max_recall = recall[recall > -1].mean() if (recall > -1).any() else 0.0
    return 100 * float(ap50), 100 * float(max_recall)


def best_gt_matches(coco_gt, detections):
    """
    For each detection, its best IoU with a non-crowd ground-truth box of the same image and
    category (0 where there is none), and that box in xywh (None where there is none).
    """
    gts = defaultdict(list)
    for ann in coco_gt.dataset["annotations"]:
        if not ann.get("iscrowd", 0):
            gts[ann["image_id"], ann["category_id"]].append(ann["bbox"])
    ious, matched = np.zeros(len(detections)), [None] * len(detections)
    for i, det in enumerate(detections):
        candidates = gts.get((det["image_id"], det["category_id"]), [])
        if candidates:
            overlaps = mask_utils.iou([det["bbox"]], candidates, [0] * len(candidates))[0]
            j = int(np.argmax(overlaps))
            ious[i], matched[i] = overlaps[j], candidates[j]
    return ious, matched


def box_errors(detections, matched):
    """Size errors (log of predicted / true width and height) and centre errors (in true widths
    and heights) of detections against their matched ground-truth boxes (xywh)."""
    pred = np.array([d["bbox"] for d in detections], dtype=np.float64).reshape(-1, 4)
    true = np.array(matched, dtype=np.float64).reshape(-1, 4)
    log_size = np.log(pred[:, 2:] / true[:, 2:])
    centre = (pred[:, :2] + pred[:, 2:] / 2 - true[:, :2] - true[:, 2:] / 2) / true[:, 2:]
    return log_size, centre


def analyze(coco_gt, detections):
    """The report as a dict (see the module docstring)."""
    ap50, max_recall = coco_ap50(coco_gt, detections)
    ious, matched = best_gt_matches(coco_gt, detections)
    oracle = [dict(d, score=float(iou)) for d, iou in zip(detections, ious)]
    oracle_ap50, _ = coco_ap50(coco_gt, oracle)

    num_gt = sum(1 for a in coco_gt.dataset["annotations"] if not a.get("iscrowd", 0))
    top = np.argsort([-d["score"] for d in detections], kind="stable")[:num_gt]
    counts, _ = np.histogram(ious[top], bins=IOU_BINS)
    report = {
        "num_detections": len(detections),
        "num_gt": num_gt,
        "AP50": ap50,
        "max_recall50": max_recall,
        "AP50_iou_ranked": oracle_ap50,
        "top_best_iou_histogram": {
            f"{lo:.2f}-{hi:.2f}": int(c) for lo, hi, c in zip(IOU_BINS, IOU_BINS[1:], counts)
        },
    }
    keep = [i for i in top if ious[i] >= MATCH_IOU]
    if keep:
        log_size, centre = box_errors([detections[i] for i in keep], [matched[i] for i in keep])
        report["matched"] = {
            "count": len(keep),
            "mean_iou": float(ious[keep].mean()),
            "log_size_ratio_mean": log_size.mean(0).tolist(),
            "log_size_ratio_std": log_size.std(0).tolist(),
            "centre_error_mean": centre.mean(0).tolist(),
            "centre_error_std": centre.std(0).tolist(),
        }
    return report


def format_report(report):
    lines = [
        f"{report['num_detections']} detections, {report['num_gt']} ground-truth boxes",
        f"AP50 as scored:           {report['AP50']:.1f}",
        f"AP50 ranked by true IoU:  {report['AP50_iou_ranked']:.1f}   (what these boxes allow)",
        f"max recall at IoU 0.5:    {report['max_recall50']:.1f}",
        f"best IoU of the top {report['num_gt']} detections: "
        + ", ".join(f"{k}: {v}" for k, v in report["top_best_iou_histogram"].items()),
    ]
    m = report.get("matched")
    if m:
        lines += [
            f"{m['count']} of them matched at IoU >= {MATCH_IOU} (mean IoU {m['mean_iou']:.2f}):",
            "  log(pred / true) width, height: mean {:+.3f} {:+.3f}, std {:.3f} {:.3f}".format(
                *m["log_size_ratio_mean"], *m["log_size_ratio_std"]
            ),
            "  centre error / true w, h:       mean {:+.3f} {:+.3f}, std {:.3f} {:.3f}".format(
                *m["centre_error_mean"], *m["centre_error_std"]
            ),
        ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="COCOEvaluator's coco_instances_results.json")
    parser.add_argument("--dataset", default="deepforest_val", help="registered dataset name")
    parser.add_argument("--gt-json", help="the ground-truth COCO json (instead of --dataset)")
    parser.add_argument("--output", help="also write the report to this JSON file")
    args = parser.parse_args(argv)

    detections = load_detections(args.results)
    gt_json = args.gt_json or gt_json_of(args.dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt_json)
    unknown = {d["image_id"] for d in detections} - set(coco_gt.getImgIds())
    if unknown:
        raise SystemExit(
            f"{args.results}: {len(unknown)} image ids are not in {gt_json} "
            f"(e.g. {sorted(unknown)[:3]}): the results belong to another dataset"
        )
    report = analyze(coco_gt, detections)
    print(format_report(report))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"results": args.results, "gt_json": gt_json, **report}, f, indent=2)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
