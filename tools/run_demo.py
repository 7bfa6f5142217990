#!/usr/bin/env python
"""
`make demo`: prepare DeepForest, train MimicDet MobileNetV2-FPN on a CPU, evaluate it on
deepforest_val with COCOEvaluator, and write output/demo/:

    model_final.pth        detectron2 checkpoint (with the training-only T-head and P2 branch)
    model_deploy.pth       what inference runs (tools/convert_to_deploy.py)
    metrics.json           detectron2's training metrics, with an evaluation every 50 iterations
    val_predictions.png    a few val tiles: ground truth (green) and predictions (orange) scoring at
                           least the threshold with the best F1 on deepforest_val (printed)
    training_curve.png     total loss and val AP / AP50 against the iteration

Every run retrains from scratch (the previous output/demo is replaced) unless --resume is given,
which continues from output/demo's last checkpoint.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/DeepForest/mimicdet_MNV2_FPN.yaml"


def run(cmd):
    print(f"$ {' '.join(map(str, cmd))}", flush=True)
    subprocess.run([str(c) for c in cmd], cwd=REPO, check=True)


def final_metrics(metrics_file):
    """The last bbox/* values that detectron2 wrote to metrics.json."""
    result = {}
    for line in Path(metrics_file).read_text().splitlines():
        record = json.loads(line)
        result.update({k: v for k, v in record.items() if k.startswith("bbox/")})
    return result


def picture(config, weights, out_file, num_tiles, threshold=None):
    """
    Predicts every val tile, picks the score threshold with the best F1 (IoU 0.5) unless one is
    given, and draws ``num_tiles`` tiles with their ground truth and the predictions that pass
    it. Returns the threshold and its F1, precision and recall on val.
    """
    sys.path.insert(0, str(REPO / "tools"))
    from demo import Predictor
    from demo_figures import best_f1_threshold, draw_boxes, f1_at, val_picture
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image
    from detectron2.structures import BoxMode

    predictor = Predictor(REPO / config, ["MODEL.WEIGHTS", str(weights)])
    records = DatasetCatalog.get("deepforest_val")
    tiles = []
    for record in records:
        image = read_image(record["file_name"], format="BGR")
        instances = predictor(image).to("cpu")
        gt = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
              for a in record["annotations"]]  # fmt: skip
        tiles.append((image, instances.pred_boxes.tensor.numpy(), instances.scores.numpy(), gt))
    triples = [(boxes, scores, gt) for _, boxes, scores, gt in tiles]
    best = best_f1_threshold(triples) if threshold is None else f1_at(triples, threshold)
    cut = best["threshold"] if best["threshold"] is not None else float("inf")
    step = max(1, len(tiles) // num_tiles)
    panels = [draw_boxes(image, gt, boxes[scores >= cut])
              for image, boxes, scores, gt in tiles[::step][:num_tiles]]  # fmt: skip
    caption = (
        f"green: ground truth; orange: predictions scoring >= {cut:.2f} "
        if best["threshold"] is not None
        else "green: ground truth; no prediction on val "
    ) + (
        f"(F1 {best['f1']:.2f}, precision {best['precision']:.2f}, recall {best['recall']:.2f} "
        f"at IoU 0.5 on all {len(tiles)} val tiles)"
    )
    val_picture(panels, out_file, caption)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="output/demo", help="output folder")
    parser.add_argument("--resume", action="store_true", help="continue the previous training")
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=None,
        help="score threshold of the picture (default: the one with the best F1 on val)",
    )
    parser.add_argument("--num-tiles", type=int, default=4, help="val tiles in the picture")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE")
    args = parser.parse_args()
    start = time.time()
    python = sys.executable
    out = REPO / args.output

    print("[demo] 1/4 preparing datasets/deepforest (no-op when present)", flush=True)
    run([python, "tools/prepare_deepforest.py"])

    print(f"[demo] 2/4 training and evaluating {CONFIG} -> {args.output}", flush=True)
    if out.exists() and not args.resume:
        shutil.rmtree(out)
    train = [python, "train_net.py", "--config-file", CONFIG]
    # an evaluation every 50 iterations draws the AP curve (~10 s each on the 20 val tiles)
    opts = ["OUTPUT_DIR", out, "TEST.EVAL_PERIOD", "50", *args.opts]
    run(train + (["--resume"] if args.resume else []) + opts)
    metrics = final_metrics(out / "metrics.json")

    print("[demo] 3/4 writing the deploy checkpoint", flush=True)
    run([python, "tools/convert_to_deploy.py", out / "model_final.pth", out / "model_deploy.pth"])

    print("[demo] 4/4 drawing predictions on val tiles and the training curve", flush=True)
    png = out / "val_predictions.png"
    best = picture(CONFIG, out / "model_deploy.pth", png, args.num_tiles, args.confidence_threshold)
    sys.path.insert(0, str(REPO / "tools"))
    from demo_figures import plot_training_curve

    curve = out / "training_curve.png"
    plot_training_curve(out / "metrics.json", curve, f"make demo: {CONFIG}")

    if best["threshold"] is None:
        shown = "no prediction on val: no box drawn"
    else:
        shown = (
            f"predictions scoring >= {best['threshold']:.2f}: F1 {best['f1']:.2f}, "
            f"precision {best['precision']:.2f}, recall {best['recall']:.2f}"
        )
    minutes, seconds = divmod(time.time() - start, 60)
    print(
        f"\n[demo] done in {int(minutes)} min {seconds:.0f} s\n"
        f"[demo] deepforest_val (COCOEvaluator): AP {metrics.get('bbox/AP', float('nan')):.1f}, "
        f"AP50 {metrics.get('bbox/AP50', float('nan')):.1f}\n"
        f"[demo] checkpoint:  {out / 'model_final.pth'}\n"
        f"[demo] deploy:      {out / 'model_deploy.pth'}\n"
        f"[demo] metrics:     {out / 'metrics.json'}\n"
        f"[demo] picture:     {png} ({shown})\n"
        f"[demo] curve:       {curve}",
        flush=True,
    )


if __name__ == "__main__":
    main()
