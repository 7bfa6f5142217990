#!/usr/bin/env python
"""
`make demo`: prepare DeepForest, train MimicDet MobileNetV2-FPN on a CPU, evaluate it on
deepforest_val with COCOEvaluator, and write output/demo/:

    model_final.pth        detectron2 checkpoint (with the training-only T-head and P2 branch)
    model_deploy.pth       what inference runs (tools/convert_to_deploy.py)
    metrics.json           detectron2's training metrics; the last line holds bbox/AP, bbox/AP50
    val_predictions.png    a few val tiles with the predicted boxes (detectron2's Visualizer)

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

import numpy as np

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


def picture(config, weights, out_file, num_tiles, threshold):
    """Draws predictions on the first ``num_tiles`` val tiles and saves them side by side."""
    sys.path.insert(0, str(REPO / "tools"))
    from demo import Predictor, draw
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image
    from PIL import Image

    predictor = Predictor(REPO / config, ["MODEL.WEIGHTS", str(weights)])
    records = DatasetCatalog.get("deepforest_val")
    step = max(1, len(records) // num_tiles)
    panels = []
    for record in records[::step][:num_tiles]:
        image = read_image(record["file_name"], format="BGR")
        panels.append(draw(image, predictor(image), predictor.metadata, threshold))
    height = max(p.shape[0] for p in panels)
    panels = [
        np.pad(p, ((0, height - p.shape[0]), (0, 4), (0, 0)), constant_values=255) for p in panels
    ]
    Image.fromarray(np.concatenate(panels, axis=1)).save(out_file)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="output/demo", help="output folder")
    parser.add_argument("--resume", action="store_true", help="continue the previous training")
    parser.add_argument("--confidence-threshold", type=float, default=0.3)
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
    run(train + (["--resume"] if args.resume else []) + ["OUTPUT_DIR", out, *args.opts])
    metrics = final_metrics(out / "metrics.json")

    print("[demo] 3/4 writing the deploy checkpoint", flush=True)
    run([python, "tools/convert_to_deploy.py", out / "model_final.pth", out / "model_deploy.pth"])

    print("[demo] 4/4 drawing predictions on val tiles", flush=True)
    png = out / "val_predictions.png"
    picture(CONFIG, out / "model_deploy.pth", png, args.num_tiles, args.confidence_threshold)

    minutes, seconds = divmod(time.time() - start, 60)
    print(
        f"\n[demo] done in {int(minutes)} min {seconds:.0f} s\n"
        f"[demo] deepforest_val (COCOEvaluator): AP {metrics.get('bbox/AP', float('nan')):.1f}, "
        f"AP50 {metrics.get('bbox/AP50', float('nan')):.1f}\n"
        f"[demo] checkpoint:  {out / 'model_final.pth'}\n"
        f"[demo] deploy:      {out / 'model_deploy.pth'}\n"
        f"[demo] metrics:     {out / 'metrics.json'}\n"
        f"[demo] picture:     {png} (boxes scoring >= {args.confidence_threshold})",
        flush=True,
    )


if __name__ == "__main__":
    main()
