#!/usr/bin/env python
"""
Evaluate a full MimicDet checkpoint on the config's test set with ``COCOEvaluator``: as the
deployed one-stage detector (the S-head) and with the training-only T-head run as a two-stage
detector on the same refined boxes, with the same post-processing. The gap is what mimicking has
left to transfer from the teacher to the student. With ``--mixed``, also each head's classes on
the other head's boxes, which splits that gap into what the S-head's classification and its
localization lose.

    python tools/evaluate_teacher.py --config-file configs/DeepForest/mimicdet_MNV2_FPN.yaml \\
        --mixed MODEL.WEIGHTS output/demo/model_final.pth
"""

import argparse
import json
import sys

from detectron2.data import build_detection_test_loader
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from torch import nn

from mimicdet import WeightsOnlyCheckpointer, get_mimicdet_cfg
from mimicdet.evaluation import HAS_DETECTRON2_OPS


# the evaluations with --mixed besides the two heads': which head's classes, which head's boxes
MIXED = {
    "t_classes_s_boxes": ("t_head", "s_head"),
    "s_classes_t_boxes": ("s_head", "t_head"),
}
LABELS = {
    "s_head": "S-head (deployed)",
    "t_head": "T-head (teacher)",
    "t_classes_s_boxes": "T-head classes, S-head boxes",
    "s_classes_t_boxes": "S-head classes, T-head boxes",
}


class MixedHeads(nn.Module):
    """The model's ``mixed_inference`` behind the usual ``model(batched_inputs)`` call."""

    def __init__(self, model, classes_from, boxes_from):
        super().__init__()
        self.model = model
        self.classes_from, self.boxes_from = classes_from, boxes_from

    def forward(self, batched_inputs):
        return self.model.mixed_inference(batched_inputs, self.classes_from, self.boxes_from)


def load_full_model(cfg):
    """Builds the model and loads ``MODEL.WEIGHTS``, refusing a checkpoint without the T-head."""
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        raise SystemExit("MODEL.WEIGHTS is empty: give the full checkpoint to evaluate")
    model = build_model(cfg)
    checkpointer = WeightsOnlyCheckpointer(model)
    state = checkpointer._load_file(weights)["model"]
    if not any(key.startswith("roi_heads.") for key in state):
        raise SystemExit(
            f"{weights} has no T-head weights (roi_heads.*): it is a deploy checkpoint or not a "
            "MimicDet one; give the training checkpoint (model_final.pth)"
        )
    checkpointer.load(weights)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="a MimicDet yaml config")
    parser.add_argument("--output", help="also write the results to this JSON file")
    parser.add_argument(
        "--mixed",
        action="store_true",
        help="also score each head's classes on the other head's boxes (two more evaluations)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    args = parser.parse_args(argv)
    setup_logger(name="mimicdet")
    setup_logger(name="detectron2")

    cfg = get_mimicdet_cfg(args.config_file, args.opts)
    cfg.freeze()
    model = load_full_model(cfg)

    dataset = cfg.DATASETS.TEST[0]
    loader = build_detection_test_loader(cfg, dataset)
    detectors = {"s_head": model, "t_head": MixedHeads(model, "t_head", "t_head")}
    if args.mixed:
        detectors.update({name: MixedHeads(model, *heads) for name, heads in MIXED.items()})
    results = {}
    for name, detector in detectors.items():
        evaluator = COCOEvaluator(dataset, use_fast_impl=HAS_DETECTRON2_OPS, output_dir=None)
        bbox = inference_on_dataset(detector, loader, evaluator)["bbox"]
        # COCO's summary metrics (AP, AP50, AP75, APs, APm, APl); per-class APs left out
        results[name] = {key: value for key, value in bbox.items() if not key.startswith("AP-")}

    print(f"\n{dataset}, {cfg.MODEL.WEIGHTS}")
    print("| head | AP | AP50 | AP75 |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {LABELS[name]} | {r['AP']:.1f} | {r['AP50']:.1f} | {r['AP75']:.1f} |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"dataset": dataset, "weights": cfg.MODEL.WEIGHTS, **results}, f, indent=2)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
