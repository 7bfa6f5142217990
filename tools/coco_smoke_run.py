#!/usr/bin/env python
"""
A COCO-scale smoke run on the CPU: a few training iterations of a COCO config on synthetic
800x1333 images with COCO's object-size mix, then the positive anchors each pyramid level got.
Every level P3..P7 should train; the run fails (exit 1) if one got no positive at all.

    python tools/coco_smoke_run.py                       # R-50 1x, 4 images, 4 iterations
    python tools/coco_smoke_run.py --iters 6 MODEL.MIMICDET.REFINE.LEVEL_ASSIGNMENT canonical

Trailing KEY VALUE pairs override the config, as for train_net.py. The weights are random
(``MODEL.WEIGHTS ""``; with FrozenBN and no ImageNet weights the losses start in the thousands):
the run checks the wiring at COCO scale, not accuracy. Writes the data and detectron2's usual
output (metrics.json, log.txt) under --output.
"""

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DATASET = "mimicdet_coco_smoke"


def smoke_opts(output_dir, iters, extra=()):
    """train_net.py options for the smoke run: synthetic data, batch 1, no evaluation."""
    return [
        "DATASETS.TRAIN", f"('{DATASET}',)",
        "DATASETS.TEST", "()",
        "DATALOADER.NUM_WORKERS", "0",
        "MODEL.WEIGHTS", "",
        "MODEL.DEVICE", "cpu",
        "SOLVER.IMS_PER_BATCH", "1",
        # random weights: a small, clipped step keeps the few iterations finite
        "SOLVER.BASE_LR", "0.001",
        "SOLVER.CLIP_GRADIENTS.ENABLED", "True",
        "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "norm",
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "1.0",
        "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.MAX_ITER", str(iters),
        "SOLVER.STEPS", "()",
        "SOLVER.CHECKPOINT_PERIOD", "100000",
        "INPUT.MIN_SIZE_TRAIN", "(800,)",
        "INPUT.MAX_SIZE_TRAIN", "1333",
        "TEST.EVAL_PERIOD", "0",
        "SEED", "0",
        "OUTPUT_DIR", output_dir,
    ] + list(extra)  # fmt: skip


def per_level_positives(storage):
    """Mean positive anchors per image on each level, and S-head samples, over all iterations."""
    return {
        key: history.avg(len(history.values()))
        for key, history in sorted(storage.histories().items())
        if key.startswith(("refine/num_pos_anchors_p", "s_head/num_"))
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config-file",
        default=os.path.join(REPO, "configs", "COCO-Detection", "mimicdet_R_50_FPN_1x.yaml"),
    )
    parser.add_argument("--iters", type=int, default=4, help="training iterations (default 4)")
    parser.add_argument("--images", type=int, default=4, help="synthetic images (default 4)")
    parser.add_argument("--boxes-per-image", type=int, default=20)
    parser.add_argument("--output", default=os.path.join(REPO, "output", "coco_smoke"))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.images < 1:
        parser.error("--iters and --images must be at least 1")

    import torch
    from detectron2.engine import default_argument_parser

    import train_net
    from mimicdet.data.synthetic_coco import register_synthetic_coco

    # random ResNet weights make denormal floats that slow the CPU's conv backward ~40x
    torch.set_flush_denormal(True)
    train_args = default_argument_parser().parse_args(
        ["--config-file", args.config_file] + smoke_opts(args.output, args.iters, args.opts)
    )
    cfg = train_net.setup_yaml(train_args)
    register_synthetic_coco(
        DATASET,
        os.path.join(args.output, "data"),
        num_images=args.images,
        boxes_per_image=args.boxes_per_image,
        num_classes=train_net.num_classes_of(cfg),
    )
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    # every iteration's value, not only the last one metrics.json keeps of a short run
    stats = per_level_positives(trainer.storage)
    levels = [k for k in stats if k.startswith("refine/num_pos_anchors_p")]
    print(f"\nPositive anchors per image, mean over {args.iters} iterations of {args.config_file}:")
    for key, value in stats.items():
        print(f"  {key}: {value:.1f}")
    untrained = [k.rsplit("_", 1)[1].upper() for k in levels if stats[k] == 0]
    if not levels or untrained:
        print(f"FAILED: no positive anchor on {', '.join(untrained) or 'any level'}")
        return 1
    print(f"every level ({', '.join(k.rsplit('_', 1)[1].upper() for k in levels)}) trained")
    return 0


if __name__ == "__main__":
    sys.exit(main())
