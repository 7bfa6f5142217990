#!/usr/bin/env python
"""
How many candidate anchors Rank Mimicking ranks per GT: the teacher's assigner, which the
distiller asks (``mimicdet.distill.candidate_matches``), against the student's own.

Rank Mimicking turns the teacher's scores of a GT's candidate anchors into a distribution by a
softmax; a GT with one candidate gives a KL of 0 whatever the student does. The paper's teacher
was a one-stage detector with the student's assigner; a Faster R-CNN teacher's RPN keeps an
anchor at IoU 0.7 (or the GT's best), RetinaNet at 0.5. This prints both counts over the
student's training batches (its augmentation and input sizes), by GT size.

With ``--teacher-weights``, it also shows how peaked the trained teacher's ranking of those
candidates is, the target Rank Mimicking hands the student: per GT with two or more candidates,
the spread of the second stage's log-odds and the largest share of the softmax under each
``MODEL.DISTILL.RANK.SCORE``.

    python tools/rank_candidates.py --dataset fashion_scenes --batches 25
    python tools/rank_candidates.py --dataset fashion_scenes --batches 10 \
        --teacher-weights <faster_rcnn run>/model_final.pth

``--seed`` (default 0) picks the batches: the same seed gives the same numbers.
"""

import argparse
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"deepforest": "DeepForest", "fashion_scenes": "FashionScenes"}
SIZE_EDGES = (0, 32, 64, 112, 224, 448, float("inf"))  # sqrt(w * h) in input pixels


def count_candidates(student, assigners, batches):
    """Per assigner name, per size bucket (an index into :data:`SIZE_EDGES`), the number of
    candidates of each GT of ``batches`` on ``student``'s anchors."""
    from detectron2.structures import Boxes

    from mimicdet.distill import candidate_matches

    counts = defaultdict(lambda: defaultdict(list))
    with torch.no_grad():
        for batch in batches:
            features = student.backbone(student.preprocess_image(batch).tensor)
            anchors = student.anchor_generator([features[f] for f in student.head_in_features])
            gts = [x["instances"] for x in batch]
            sizes = Boxes.cat([gt.gt_boxes for gt in gts]).area().sqrt()
            buckets = torch.bucketize(sizes, torch.tensor(SIZE_EDGES[1:-1]), right=True)
            for name, assigner in assigners.items():
                per_gt = [
                    torch.bincount(matched[matched >= 0], minlength=len(gt))
                    for matched, gt in zip(candidate_matches(assigner, anchors, gts), gts)
                ]
                for bucket, n in zip(buckets.tolist(), torch.cat(per_gt).tolist()):
                    counts[name][bucket].append(n)
    return counts


def teacher_rankings(student, teacher, batches):
    """Per GT with two or more RPN candidates on ``student``'s anchors: ``(spread, shares)``,
    the max minus the min of the teacher's second-stage log-odds of the GT's class over the
    candidates, and per ``RANK_SCORES`` entry the largest share of the softmax Rank Mimicking
    takes as its target (``mimicdet.distill.rank_targets``, what the loss compares)."""
    import torch.nn.functional as F

    from mimicdet.distill import RANK_SCORES, dense_view, rank_targets

    view = dense_view(teacher, student.num_classes, "roi_head")
    rankings = []
    with torch.no_grad():
        for batch in batches:
            features = student.backbone(student.preprocess_image(batch).tensor)
            anchors = student.anchor_generator([features[f] for f in student.head_in_features])
            t_images = teacher.preprocess_image(batch)
            t_features = teacher.backbone(t_images.tensor)
            gts = [x["instances"] for x in batch]
            for *_, log_odds in rank_targets(
                view, t_features, None, anchors, gts, t_images.image_sizes
            ):
                if len(log_odds) < 2:
                    continue
                by_score = {"probability": log_odds.sigmoid(), "logit": log_odds}
                shares = {k: F.softmax(by_score[k], 0).max().item() for k in RANK_SCORES}
                rankings.append(((log_odds.max() - log_odds.min()).item(), shares))
    return rankings


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(FOLDERS), default="fashion_scenes")
    parser.add_argument("--batches", type=int, default=25, help="training batches looked at")
    parser.add_argument(
        "--teacher-weights",
        help="the dataset's trained Faster R-CNN (model_final.pth): also measure how peaked its "
        "ranking of each GT's candidates is",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="which images, in which order and augmentation"
    )
    args = parser.parse_args(argv)
    if args.teacher_weights and not Path(args.teacher_weights).is_file():
        parser.error(f"--teacher-weights {args.teacher_weights}: no such file")

    from detectron2.modeling import build_model
    from detectron2.utils.env import seed_all_rng

    import mimicdet  # noqa: F401  (registers the datasets)
    from mimic_agreement import training_batches
    from mimicdet.config import get_mimicdet_cfg

    folder = REPO / "configs" / FOLDERS[args.dataset]
    student_cfg = get_mimicdet_cfg(
        str(folder / "retinanet_MNV2_FPN.yaml"), ["DATALOADER.NUM_WORKERS", "0"]
    )
    teacher_cfg = get_mimicdet_cfg(str(folder / "faster_rcnn_MNV2_FPN.yaml"))
    student_cfg.MODEL.DEVICE = teacher_cfg.MODEL.DEVICE = "cpu"
    student, teacher = build_model(student_cfg).eval(), build_model(teacher_cfg).eval()
    # the distiller's assigner of a Faster R-CNN teacher is its RPN (dense_view)
    assigners = {"teacher's RPN": teacher.proposal_generator, "student's own": student}

    def batches():
        """The same training batches at every call (the student's augmentation and input sizes):
        the numbers printed depend on the images, so a seed makes them reproducible."""
        seed_all_rng(args.seed)
        return training_batches(student_cfg, args.batches, args.seed)

    counts = count_candidates(student, assigners, batches())
    print(f"{args.dataset}, {args.batches} training batches: candidates per GT (mean; share of")
    print("GTs with exactly one, whose KL is 0)")
    print("| GT size (px) | GTs | " + " | ".join(assigners) + " |")
    print("|---|---|" + "---|" * len(assigners))
    for bucket in range(len(SIZE_EDGES) - 1):
        rows = [counts[name][bucket] for name in assigners]
        if not rows[0]:
            continue
        lo, hi = SIZE_EDGES[bucket], SIZE_EDGES[bucket + 1]
        cells = [f"{sum(r) / len(r):.1f} ({sum(n == 1 for n in r) / len(r):.0%})" for r in rows]
        print(f"| {lo:g}-{hi:g} | {len(rows[0])} | " + " | ".join(cells) + " |")
    if args.teacher_weights:
        from detectron2.checkpoint import DetectionCheckpointer

        DetectionCheckpointer(teacher).load(args.teacher_weights)
        rankings = teacher_rankings(student, teacher, batches())
        if not rankings:
            raise SystemExit("no GT with two or more candidates in these batches")
        spreads = torch.tensor([spread for spread, _ in rankings])
        print(f"\nThe trained teacher's ranking, {len(rankings)} GTs with two or more candidates:")
        print(f"log-odds spread over a GT's candidates: median {spreads.median():.1f}, "
              f"quartiles {spreads.quantile(0.25):.1f}-{spreads.quantile(0.75):.1f}")
        for score in rankings[0][1]:
            top = torch.tensor([shares[score] for _, shares in rankings])
            print(f"RANK.SCORE {score}: the top candidate's share of the target, mean "
                  f"{top.mean():.2f}; above 0.9 for {(top > 0.9).float().mean():.0%} of GTs")


if __name__ == "__main__":
    main()
