#!/usr/bin/env python
"""
Strip a checkpoint to what inference runs, with no optimizer or trainer state:
- MimicDet: no T-head (``roi_heads.*``, and ``t_backbone.*`` when it has its own) and no P2
  branch (the finest FPN lateral and output convs);
- a Distiller (``mimicdet.distill``): the student alone, under its own key names, without the
  teacher (never in a checkpoint) or the adaptation layers (``kd_adapters.*``); a MimicDet student
  is then stripped as above.

    python tools/convert_to_deploy.py output/model_final.pth output/model_deploy.pth

The result loads with the student's (or MimicDet's) own config and gives the same inference
outputs. It is marked as a deploy checkpoint (``"deploy": True``), so converting it again changes
nothing: its finest remaining FPN stage is one that inference runs.
"""

import argparse
import os
import re

import torch

from mimicdet.checkpoint import atomic_write

# the T-head, and its own pyramid when it has one (MODEL.MIMICDET.T_HEAD.BACKBONE "separate_*")
TRAINING_ONLY_PREFIXES = ("roi_heads.", "t_backbone.")
# what a Distiller's checkpoint holds: the student and the adaptation layers (training only)
STUDENT_PREFIX = "student."
ADAPTERS_PREFIX = "kd_adapters."
# a MimicDet state dict is the one with an S-head; only MimicDet has a training-only pyramid level
_MIMICDET_KEY = re.compile(r"^s_head\.")
_FPN_BRANCH = re.compile(r"^backbone\.fpn_(lateral|output)(\d+)\.")


def training_only_keys(state_dict, deployed=False):
    """
    Keys of a MimicDet state dict's T-head and of its finest FPN level's lateral and output convs;
    with ``deployed`` (the state dict already went through :func:`convert`) the T-head's only.
    """
    stages = [] if deployed else [int(m.group(2)) for m in map(_FPN_BRANCH.match, state_dict) if m]
    finest = min(stages) if stages else None
    return [
        k
        for k in state_dict
        if k.startswith(TRAINING_ONLY_PREFIXES)
        or ((m := _FPN_BRANCH.match(k)) and int(m.group(2)) == finest)
    ]


def student_state_dict(state_dict):
    """
    A Distiller's state dict -> its student's, under the student's own key names (adapters
    dropped); any other state dict is returned as it is.
    """
    if not any(k.startswith(STUDENT_PREFIX) for k in state_dict):
        return state_dict
    unexpected = [k for k in state_dict if not k.startswith((STUDENT_PREFIX, ADAPTERS_PREFIX))]
    if unexpected:
        raise ValueError(
            f"A distiller checkpoint holds student.* and kd_adapters.* only; this one also has "
            f"{unexpected[:5]}"
        )
    n = len(STUDENT_PREFIX)
    return {k[n:]: v for k, v in state_dict.items() if k.startswith(STUDENT_PREFIX)}


def _num_params(state_dict):
    return sum(v.numel() for v in state_dict.values() if torch.is_tensor(v))


def convert(in_path: str, out_path: str) -> dict:
    """Write the deploy checkpoint; returns sizes (bytes) and parameter counts before and after."""
    checkpoint = torch.load(in_path, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("model", checkpoint)
    student = student_state_dict(state_dict)
    # only MimicDet has training-only modules; other detectors' students are kept whole
    dropped = set()
    if any(map(_MIMICDET_KEY.match, student)):
        dropped = set(training_only_keys(student, deployed=checkpoint.get("deploy", False)))
    dropped_names = sorted(dropped) + sorted(k for k in state_dict if k.startswith(ADAPTERS_PREFIX))
    deploy = {k: v for k, v in student.items() if k not in dropped}
    # an interrupted conversion must not leave a truncated checkpoint behind
    atomic_write(out_path, lambda f: torch.save({"model": deploy, "deploy": True}, f))
    return {
        "dropped_keys": dropped_names,
        "student_only": student is not state_dict,
        "size_before": os.path.getsize(in_path),
        "size_after": os.path.getsize(out_path),
        "params_before": _num_params(state_dict),
        "params_after": _num_params(deploy),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="a training checkpoint (.pth)")
    parser.add_argument("output", help="where to write the deploy checkpoint (.pth)")
    args = parser.parse_args()
    stats = convert(args.input, args.output)
    prefixes = sorted({".".join(k.split(".")[:2]) for k in stats["dropped_keys"]})
    if stats["student_only"]:
        print("a distiller checkpoint: kept the student alone, under its own key names")
    print(f"dropped {len(stats['dropped_keys'])} tensors under {', '.join(prefixes) or 'nothing'}")
    before, after = stats["size_before"] / 2**20, stats["size_after"] / 2**20
    print(f"file size: {before:.2f} MiB -> {after:.2f} MiB")
    print(f"parameters: {stats['params_before']:,} -> {stats['params_after']:,}")


if __name__ == "__main__":
    main()
