#!/usr/bin/env python
"""
The DeepForest distillation table: each distilled student's COCO AP on deepforest_val beside its
undistilled baseline (same data, schedule and seed), from the runs of docs/distillation.md.

    python tools/distill_report.py --json benchmarks/distill_deepforest_cpu.json \\
        --markdown benchmarks/distill_deepforest_cpu.md

Reads each run's ``metrics.json`` under ``output/distill/``: the final evaluation, and the mean
of each KD term's logged values (each a 20-iteration median) over the last 100 iterations, what
the student was still being taught. A run that has not finished is reported as missing, never as
a number.
"""

import argparse
import json
import math
import os
import statistics
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = "configs/DeepForest/distill"
# (row, config, output dir under output/distill/ if not the config's name, baseline row): each
# config's own OUTPUT_DIR; a "seed 2" row is compared with its baseline's seed 2 (the spread
# between a baseline's two seeds is what one run cannot tell from a method's effect)
RUNS = [
    ("Faster R-CNN (teacher)", "faster_rcnn_MNV2_FPN_teacher.yaml", "faster_rcnn_teacher", None),
    ("MimicDet (teacher)", "mimicdet_MNV2_FPN_teacher.yaml", "mimicdet_teacher", None),
    ("RetinaNet", "retinanet_MNV2_FPN_student.yaml", "retinanet_student", None),
    (
        "RetinaNet, seed 2",
        "retinanet_MNV2_FPN_student.yaml",
        "retinanet_student_seed2",
        "RetinaNet",
    ),
    ("RetinaNet + FGFI", "retinanet_fgfi_from_frcnn.yaml", None, "RetinaNet"),
    ("RetinaNet + DeFeat", "retinanet_defeat_from_frcnn.yaml", None, "RetinaNet"),
    ("RetinaNet + RM+PFI", "retinanet_rm_pfi_from_frcnn.yaml", None, "RetinaNet"),
    (
        "RetinaNet + RM+PFI, seed 2",
        "retinanet_rm_pfi_from_frcnn.yaml",
        "retinanet_rm_pfi_from_frcnn_seed2",
        "RetinaNet, seed 2",
    ),
    (
        "RetinaNet + DeFeat (MimicDet teacher)",
        "retinanet_defeat_from_mimicdet.yaml",
        None,
        "RetinaNet",
    ),
    ("FCOS", "fcos_MNV2_FPN_student.py", "fcos_student", None),
    ("FCOS, seed 2", "fcos_MNV2_FPN_student.py", "fcos_student_seed2", "FCOS"),
    ("FCOS + FGFI", "fcos_fgfi_from_frcnn.py", None, "FCOS"),
    ("FCOS + DeFeat", "fcos_defeat_from_frcnn.py", None, "FCOS"),
]
METRICS = ["AP", "AP50", "AP75", "APs", "APm"]


def read_run(out_dir):
    """The final bbox metrics and late KD terms of one run, or None."""
    path = os.path.join(out_dir, "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    evals = [r for r in records if "bbox/AP" in r]
    if not evals:
        return None
    final = evals[-1]
    steps = [r for r in records if "time" in r]
    last = final["iteration"]
    late = [r for r in steps if r["iteration"] > last - 100]
    kd = sorted({k for r in late for k in r if k.startswith("loss_kd_")})
    return {
        "iteration": last,
        # NaN (no object of that size) is not JSON: None
        **{m: None if math.isnan(final[f"bbox/{m}"]) else final[f"bbox/{m}"] for m in METRICS},
        "late_kd_terms": {k: statistics.mean(r[k] for r in late if k in r) for k in kd},
    }


def _seed2_opts(config, out):
    if config.endswith(".py"):
        return f" train.seed=2 train.output_dir=output/distill/{out}"
    return f" SEED 2 OUTPUT_DIR output/distill/{out}"


def _fmt(x):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def markdown(rows):
    lines = [
        "| model | AP | AP50 | AP75 | APs | APm | AP vs baseline | KD terms (last 100 its) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_name = {r["row"]: r for r in rows}
    for r in rows:
        if r["result"] is None:
            lines.append(f"| {r['row']} | not run | | | | | | |")
            continue
        res = r["result"]
        delta = ""
        base = by_name.get(r["baseline"]) if r["baseline"] else None
        if base and base["result"]:
            delta = f"{res['AP'] - base['result']['AP']:+.1f}"
        kd = ", ".join(f"{k[8:]} {v:.3f}" for k, v in res["late_kd_terms"].items())
        lines.append(
            f"| {r['row']} | " + " | ".join(_fmt(res[m]) for m in METRICS)
            + f" | {delta} | {kd} |"
        )  # fmt: skip
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--output-root", default=os.path.join(REPO, "output", "distill"))
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    rows = [
        {
            "row": row,
            "config": f"{CONFIGS}/{config}",
            "command": f"python train_net.py --config-file {CONFIGS}/{config}"
            + (_seed2_opts(config, out) if out.endswith("_seed2") else ""),
            "baseline": baseline,
            "result": read_run(os.path.join(args.output_root, out)),
        }
        for row, config, out, baseline in RUNS
        for out in [out or os.path.splitext(config)[0]]
    ]
    table = markdown(rows)
    print(table)
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    header = (
        "Command: `python tools/distill_report.py` over the runs of docs/distillation.md  \n"
        f"Date: {date}  \n"
        "Data: deepforest_train (72 tiles) -> deepforest_val, COCOEvaluator, seed 1, one run each"
        "\n\n"
    )
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(header + table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": date, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
