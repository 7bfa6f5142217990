#!/usr/bin/env python
"""
Strip a MimicDet checkpoint to what inference runs: no T-head (``roi_heads.*``) and no P2 branch
(the finest FPN lateral and output convs), no optimizer or trainer state.

    python tools/convert_to_deploy.py output/model_final.pth output/model_deploy.pth

The result loads with the same config and gives the same inference outputs. It is marked as a
deploy checkpoint (``"deploy": True``), so converting it again changes nothing: its finest
remaining FPN stage is one that inference runs.
"""

import argparse
import os
import re

import torch

from mimicdet.checkpoint import atomic_write

TRAINING_ONLY_PREFIX = "roi_heads."
_FPN_BRANCH = re.compile(r"^backbone\.fpn_(lateral|output)(\d+)\.")


def training_only_keys(state_dict, deployed=False):
    """
    Keys of the T-head and of the finest FPN level's lateral and output convs; with
    ``deployed`` (the state dict already went through :func:`convert`) the T-head's only.
    """
    stages = [] if deployed else [int(m.group(2)) for m in map(_FPN_BRANCH.match, state_dict) if m]
    finest = min(stages) if stages else None
    return [
        k
        for k in state_dict
        if k.startswith(TRAINING_ONLY_PREFIX)
        or ((m := _FPN_BRANCH.match(k)) and int(m.group(2)) == finest)
    ]


def _num_params(state_dict):
    return sum(v.numel() for v in state_dict.values() if torch.is_tensor(v))


def convert(in_path: str, out_path: str) -> dict:
    """Write the deploy checkpoint; returns sizes (bytes) and parameter counts before and after."""
    checkpoint = torch.load(in_path, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("model", checkpoint)
    dropped = set(training_only_keys(state_dict, deployed=checkpoint.get("deploy", False)))
    deploy = {k: v for k, v in state_dict.items() if k not in dropped}
    # an interrupted conversion must not leave a truncated checkpoint behind
    atomic_write(out_path, lambda f: torch.save({"model": deploy, "deploy": True}, f))
    return {
        "dropped_keys": sorted(dropped),
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
    print(f"dropped {len(stats['dropped_keys'])} tensors under {', '.join(prefixes)}")
    before, after = stats["size_before"] / 2**20, stats["size_after"] / 2**20
    print(f"file size: {before:.2f} MiB -> {after:.2f} MiB")
    print(f"parameters: {stats['params_before']:,} -> {stats['params_after']:,}")


if __name__ == "__main__":
    main()
