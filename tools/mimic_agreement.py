#!/usr/bin/env python
"""
How closely a MimicDet checkpoint's S-head follows its T-head on the pairs that mimicking
compares: the T-head's sampled refined boxes, up to ``MIMIC.NUM_PER_IMAGE`` per image, with the
S-head read at each box's anchor location. For a few batches of the config's train split, run
through the training forward without a gradient, it reports the two cosine mimic losses and,
beside them, what each head's softmax gives a positive box's label and a negative box's
background, and the norms of the two heads' class logits. Mimicking is switched on for the
measurement on both paths whatever the config says, so that a checkpoint trained without it is
measured on the same pairs; the losses are only read, never applied. With the same ``--seed``
two checkpoints see the same images, augmentations and sampled boxes as far as their refined
boxes agree.

With ``--gradients`` each batch also runs backward, loss by loss, to two groups of parameters:
``shared``, the S-head's parameters that its class and box branches share (the guided deformable
convs and their offset nets, ``t`` in ``SHead.forward``), and ``backbone``, the backbone and FPN
that every head reads. For each group the tool reports each loss's gradient norm (as weighted in
training) and the cosine between every two losses' gradients. A negative cosine between the
regression mimic loss and a classification loss means the two pull those parameters apart.

    python tools/mimic_agreement.py --config-file configs/FashionScenes/mimicdet_MNV2_FPN.yaml \\
        --batches 10 MODEL.WEIGHTS output/fashion_scenes/mimicdet_MNV2_FPN/model_final.pth
"""

import argparse
import contextlib
import json
import math
import sys
from itertools import combinations, islice
from pathlib import Path

import torch
import torch.nn.functional as F
from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data.samplers import TrainingSampler
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "projects" / "MimicDet"))
sys.path.insert(0, str(REPO / "tools"))

from evaluate_teacher import load_full_model  # noqa: E402
from mimicdet import get_mimicdet_cfg  # noqa: E402
from mimicdet.modeling.mimic_loss import student_at_anchors, teacher_at_boxes  # noqa: E402


def pair_statistics(boxes, student_cls_logits, student_reg_feats, losses):
    """The measures of one step's mimicked pairs (``DualPathMimicLoss``'s arguments and result):
    the mimic losses, the heads' softmax on the pairs' labels, the logits' norms."""
    student = student_at_anchors(student_cls_logits, boxes)
    teacher = teacher_at_boxes(boxes, "cls")
    labels = torch.cat([b.gt_classes for b in boxes])
    background = student.shape[1] - 1
    positive = labels < background
    stats = {name: loss.item() for name, loss in losses.items()}
    for head, logits in (("s", student), ("t", teacher)):
        probs = F.softmax(logits.float(), dim=1)
        stats[f"{head}_prob_of_label_positives"] = probs[positive, labels[positive]].mean().item()
        stats[f"{head}_prob_of_background_negatives"] = probs[~positive, background].mean().item()
        stats[f"{head}_logit_norm"] = logits.float().norm(dim=1).mean().item()
    stats.update(pairs=len(student), positive_pairs=int(positive.sum()))
    return stats


# the S-head's training losses whose gradients --gradients compares, group by group
GRADIENT_LOSSES = ("loss_s_cls", "loss_mimic_cls", "loss_s_box", "loss_mimic_reg")


def gradient_groups(model):
    """The parameter groups that --gradients measures: ``shared``, the S-head's parameters before
    its class and box branches split (the guided deformable convs and the offset nets that steer
    them), and ``backbone``, the backbone with its FPN."""
    head = model.s_head
    return {
        "shared": [p for m in (head.offset_nets, head.deform_convs) for p in m.parameters()],
        "backbone": [p for p in model.backbone.parameters() if p.requires_grad],
    }


def gradient_statistics(losses, groups, names=GRADIENT_LOSSES):
    """Each loss's gradient on each group of ``groups`` (name -> parameters; one flat vector a
    group, zeros where a loss does not reach it): its norm, ``<group>_grad_norm_<loss>``, and every
    two gradients' cosine, ``<group>_grad_cos_<loss>_<loss>`` (NaN where a gradient is zero),
    names without ``loss_``. One backward pass a loss serves every group."""
    missing = [name for name in names if name not in losses]
    if missing:
        raise ValueError(f"the training step returned no {missing}: have {sorted(losses)}")
    parameters = [p for group in groups.values() for p in group]
    grads = {group: {} for group in groups}
    for name in names:
        parts = torch.autograd.grad(losses[name], parameters, retain_graph=True, allow_unused=True)
        parts = iter(g if g is not None else torch.zeros_like(p) for g, p in zip(parts, parameters))
        for group, members in groups.items():
            grads[group][name] = torch.cat([next(parts).flatten() for _ in members]).double()
    short = {name: name.removeprefix("loss_") for name in names}
    stats = {}
    for group, by_loss in grads.items():
        norms = {name: grad.norm() for name, grad in by_loss.items()}
        for name in names:
            stats[f"{group}_grad_norm_{short[name]}"] = norms[name].item()
        for a, b in combinations(names, 2):
            both = norms[a] * norms[b]
            cos = (by_loss[a] @ by_loss[b] / both).item() if both > 0 else math.nan
            stats[f"{group}_grad_cos_{short[a]}_{short[b]}"] = cos
    return stats


@contextlib.contextmanager
def recording_mimic_pairs(model):
    """Within it, every training step of ``model`` (a MimicDet with mimicking on) appends its
    pairs' measures to the yielded list, read by a forward hook on ``model.mimic_loss``."""
    if model.mimic_loss is None:
        raise ValueError("the model has mimicking off (MODEL.MIMICDET.MIMIC): no pairs to record")
    records = []

    def record(module, args, losses):
        records.append(pair_statistics(*args, losses))

    handle = model.mimic_loss.register_forward_hook(record)
    try:
        yield records
    finally:
        handle.remove()


def measure(cfg, batches, seed=0, gradients=False):
    """Means of :func:`pair_statistics` over ``batches`` training batches of ``cfg``'s model,
    loaded from ``cfg.MODEL.WEIGHTS``; with ``gradients``, of :func:`gradient_statistics` on
    :func:`gradient_groups` too."""
    if not cfg.MODEL.MIMICDET.T_HEAD.ENABLED:
        raise SystemExit("MODEL.MIMICDET.T_HEAD.ENABLED is False: there is no teacher to compare")
    seed_all_rng(seed)
    model = load_full_model(cfg)
    model.train()  # the training forward is what samples and pairs the boxes
    groups = gradient_groups(model)
    with recording_mimic_pairs(model) as records, EventStorage():
        for batch in training_batches(cfg, batches, seed):
            with torch.set_grad_enabled(gradients):
                losses = model(batch)
            if gradients:
                records[-1].update(gradient_statistics(losses, groups))
    if not records:
        raise SystemExit(f"no mimicked pairs in {batches} batches of {cfg.DATASETS.TRAIN}")
    return {key: mean_over_batches(records, key) for key in records[0]}


def training_batches(cfg, batches, seed=0):
    """The first ``batches`` batches of ``cfg``'s training loader (its augmentation), in the order
    a sampler seeded with ``seed`` draws the images: the same batches for every model measured."""
    dataset = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    )
    loader = build_detection_train_loader(
        cfg, dataset=dataset, sampler=TrainingSampler(len(dataset), seed=seed)
    )
    return islice(loader, batches)


def mean_over_batches(records, key):
    """The mean of ``key`` over the batches that measured it: a batch without a positive pair has
    no label probability to give (NaN), and the result is NaN only if no batch had one."""
    values = [r[key] for r in records if not math.isnan(r[key])]
    return sum(values) / len(values) if values else math.nan


def report(result, output=None):
    """Prints ``result`` as JSON, also writes it to ``output`` if given, and returns it."""
    print(json.dumps(result, indent=1))
    if output:
        Path(output).write_text(json.dumps(result, indent=1) + "\n")
    return result


def measuring_parser(doc, config_help, batches):
    """The arguments of the tools that measure a model on training batches (this one,
    pfi_weight.py, kd_gradients.py): ``--config-file``, ``--batches``, ``--seed``, ``--output``
    and the config overrides; ``doc``'s first paragraph describes the tool."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help=config_help)
    parser.add_argument("--batches", type=int, default=batches, help="training batches to measure")
    parser.add_argument("--seed", type=int, default=0, help="images, augmentation and sampling")
    parser.add_argument("--output", help="also write the results to this JSON file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    return parser


def distiller_tool_main(argv, doc, measure, describe):
    """``main`` of a tool that measures a Distiller's checkpoint (pfi_weight.py, kd_gradients.py):
    its config and overrides, then ``describe(cfg)`` (what the result says it measured) and
    ``measure(cfg, batches, seed)``, reported as JSON."""
    args = measuring_parser(doc, "the Distiller's config (a run's)", batches=4).parse_args(argv)
    cfg = get_mimicdet_cfg(args.config_file, args.opts)
    cfg.freeze()
    result = {"weights": cfg.MODEL.WEIGHTS, "batches": args.batches, "seed": args.seed}
    result.update(describe(cfg))
    result.update(measure(cfg, args.batches, args.seed))
    return report(result, args.output)


def main(argv=None):
    parser = measuring_parser(__doc__, "a MimicDet yaml config", batches=10)
    parser.add_argument(
        "--gradients",
        action="store_true",
        help="also compare the losses' gradients on the S-head's shared convs and on the "
        "backbone (runs backward)",
    )
    args = parser.parse_args(argv)

    # both paths measured, whichever the checkpoint trained with
    on = ["MODEL.MIMICDET.MIMIC.ENABLED", "True", "MODEL.MIMICDET.MIMIC.PATHS", "['cls', 'reg']"]
    cfg = get_mimicdet_cfg(args.config_file, args.opts + on)
    cfg.freeze()
    result = {"weights": cfg.MODEL.WEIGHTS, "batches": args.batches, "seed": args.seed}
    result.update(measure(cfg, args.batches, args.seed, args.gradients))
    return report(result, args.output)


if __name__ == "__main__":
    main(sys.argv[1:])
