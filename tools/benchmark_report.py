"""
Tables and plots of tools/benchmark.py, assembled from the committed run results alone
(``<results>/runs/<dataset>/<row>/<variant>-seed<k>.json``), so that a benchmark run in parts, on
several machines, reports as one.

    python tools/benchmark.py --report

Writes ``<results>/results.json``, ``<results>/<dataset>.md``, ``<results>/<dataset>_ap_curves.png``
(the reported seeds of every row), ``<results>/<dataset>_tuning_curves.png`` (every variant of each
sweep) and ``<results>/<dataset>_speed_accuracy.png`` for every dataset with results.
"""

import itertools
import json
import statistics
from pathlib import Path

from benchmark_rows import DATASETS, LEARNING_RATES, ROWS, root_row, variant_name

COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# tools/evaluate_teacher.py --mixed: the T-head's classes on the S-head's boxes, and the reverse
MIXED_HEADS = ("t_classes_s_boxes", "s_classes_t_boxes")
# a training that had less of the machine's CPU time than this shared it with other work: its
# seconds per iteration are flagged (tools/benchmark.py's cpu_share)
CONTENDED_SHARE = 0.85


def load_runs(results, max_iters=None):
    """{dataset: {row: {variant: {seed: result}}}} of every committed run of a known dataset and
    row (others, e.g. of a renamed row, are named and left out). With ``max_iters``
    ({dataset: iterations}), only the runs of that schedule: a run left from before a schedule
    change must neither win a sweep nor enter a mean."""
    runs = {}
    for path in sorted(Path(results).glob("runs/*/*/*-seed*.json")):
        result = json.loads(path.read_text())
        if result["dataset"] not in DATASETS or result["row"] not in ROWS:
            print(f"[benchmark] {path}: unknown dataset or row, left out of the report")
            continue
        schedule = (max_iters or {}).get(result["dataset"], result["max_iter"])
        if result["max_iter"] != schedule:
            print(
                f"[benchmark] {path}: {result['max_iter']} iterations, the schedule reported is "
                f"{schedule}: left out of the report"
            )
            continue
        by_variant = runs.setdefault(result["dataset"], {}).setdefault(result["row"], {})
        by_variant.setdefault(result["variant"], {})[result["seed"]] = result
    return runs


def ranking_ap(result):
    """A run's final AP for choosing among variants; none or nan (no detections) ranks -1."""
    value = result["final"].get("AP")
    return value if value is not None and value == value else -1.0


# the sweep's plain learning-rate runs, in its order
LR_VARIANTS = tuple(variant_name(lr) for lr in LEARNING_RATES)


def sweep_order(variant):
    """Sort key of tools/benchmark.py's sweep order: the plain learning rates as LEARNING_RATES
    lists them, then the key's values. Of equal APs the first in this order wins, in training's
    choice and the report's alike."""
    if variant in LR_VARIANTS:
        return (0, LR_VARIANTS.index(variant), "")
    return (1, 0, variant)


def chosen_variant(runs, row_name):
    """The tuned detector's variant with the best seed-0 AP among those run (a parent's for an
    ablation or a distilled row); ``complete`` says whether its whole sweep has run."""
    root = root_row(row_name)
    seed0 = {v: seeds[0] for v, seeds in runs.get(root, {}).items() if 0 in seeds}
    if not seed0:
        return None, False
    best = max(sorted(seed0, key=sweep_order), key=lambda v: ranking_ap(seed0[v]))
    lr_done = all(name in seed0 for name in LR_VARIANTS)
    key = ROWS[root].key
    if key is None or not lr_done:
        return best, lr_done
    # as tools/benchmark.py's sweep: every other value of the key at the best learning rate
    # (each config's own value is one of the candidates: tests/test_benchmark.py checks it)
    best_lr = max(LR_VARIANTS, key=lambda v: ranking_ap(seed0[v]))
    tried = [v for v in seed0 if v.startswith(f"{best_lr}-{key.label}")]
    return best, len(tried) == len(key.candidates) - 1


def _mean(values):
    values = [v for v in values if v is not None and v == v]
    return statistics.mean(values) if values else None


def summarize(runs, row_name):
    """
    One table row: the chosen variant's reported seeds (1..n), means over those that learned.
    Until a reported seed exists, the tuning run (seed 0) stands in, marked as such: it was
    chosen for its val AP, so it flatters the row.
    """
    variant, complete = chosen_variant(runs, row_name)
    seeds = runs.get(row_name, {}).get(variant, {}) if variant else {}
    reported = {s: r for s, r in seeds.items() if s >= 1} or seeds
    if not reported:
        return None
    learned = [r for _, r in sorted(reported.items()) if r["learned"]]
    first = reported[min(reported)]
    # step times of the first seed's kind of device (a run may come from a GPU machine's --pack):
    # one mean of CPU and GPU steps would describe neither
    same_device = [
        r
        for r in reported.values()
        if device_of(r.get("machine")) == device_of(first.get("machine"))
    ]
    # the runs whose inference was timed with the yardstick beside it, of the first seed's
    # network: a seed of another parameter count ran another config, so its time is not this one's
    timed = [r for r in same_device if r.get("yardstick_ms") and r.get("infer_ms") is not None]
    for r in timed:
        if r.get("params") != first.get("params"):
            print(
                f"[benchmark] {row_name} {variant} seed {r['seed']}: {r.get('params')} parameters,"
                f" not seed {first['seed']}'s {first.get('params')}: its inference left out"
            )
    timed = [r for r in timed if r.get("params") == first.get("params")]
    row = {
        "title": ROWS[row_name].title,
        "variant": variant,
        "sweep_complete": complete,
        "seeds": sorted(reported),
        "tuning_run_only": 0 in reported,
        "AP_per_seed": [reported[s]["final"].get("AP") for s in sorted(reported)],
        # where each seed trained: seeds added in a later sitting may come from another machine
        # or thread count
        "machine_per_seed": [reported[s].get("machine") for s in sorted(reported)],
        "did_not_learn": [s for s in sorted(reported) if not reported[s]["learned"]],
        "train_s_per_iter": _mean([r["train_s_per_iter"] for r in same_device]),
        # the share of the machine each training had: None for runs recorded before it was
        "train_cpu_share": [r.get("train_cpu_share") for r in same_device],
        # every timed seed's ratio of its inference to the yardstick timed interleaved with it,
        # which normalize_inference pools over every run of the same deploy network, and their
        # median yardstick; else the first seed's raw ms (runs recorded before the yardstick)
        "infer_ms": first.get("infer_ms"),
        "yardstick_ms": statistics.median(r["yardstick_ms"] for r in timed) if timed else None,
        "infer_ratios": [r["infer_ms"] / r["yardstick_ms"] for r in timed],
        "params": first.get("params"),
        "gflops": first.get("gflops"),
        "max_iter": first["max_iter"],
        "machine": first.get("machine"),
        "teacher_AP": [(r.get("teacher") or {}).get("AP") for r in reported.values()],
    }
    for key in COLUMNS:
        row[key] = _mean([r["final"].get(key) for r in learned])
    row["heads"] = two_heads(learned)
    return row


def two_heads(learned):
    """MimicDet's deployed S-head beside its training-only T-head, means over the learned runs
    whose T-head was scored (``t_head_final``; none before 2026-12-04): None if there are none."""
    paired = [r for r in learned if r.get("t_head_final")]
    if not paired:
        return None
    heads = {
        "seeds": [r["seed"] for r in paired],
        "s_head": {key: _mean([r["final"].get(key) for r in paired]) for key in COLUMNS},
        "t_head": {key: _mean([r["t_head_final"].get(key) for r in paired]) for key in COLUMNS},
        "mixed": None,
    }
    # each head's classes on the other's boxes (``mixed_heads_final``; none before 2026-12-05),
    # beside the S-head's AP of the same runs
    mixed = [r for r in paired if r.get("mixed_heads_final")]
    if mixed:
        heads["mixed"] = {
            "seeds": [r["seed"] for r in mixed],
            "s_head_AP": _mean([r["final"].get("AP") for r in mixed]),
            **{
                name: _mean([r["mixed_heads_final"][name].get("AP") for r in mixed])
                for name in MIXED_HEADS
            },
        }
    return heads


def train_timing_clean(row):
    """True if the row's step was re-timed beside the others (``--retime-training``), or every
    reported training of the row had the machine to itself."""
    if row.get("train_retimed"):
        return True
    shares = row["train_cpu_share"]
    return all(share is not None and share >= CONTENDED_SHARE for share in shares)


def device_of(machine):
    """ "CPU" or "CUDA": the last word of tools/benchmark.py's machine description."""
    return (machine or "").rsplit(" ", 1)[-1]


def machine_model(machine):
    """tools/benchmark.py's machine description without its thread counts: the runs of one
    machine trained alone or in lanes (other threads, the same processor and torch)."""
    return ", ".join(part for part in (machine or "").split(", ") if "threads" not in part)


def deploy_network(name, row):
    """What a row deploys, for timing: its root detector (an ablation's or a distilled
    student's change is training-only, so it deploys its parent's network) with its parameter
    count (a run whose count differs deploys another network), on its kind of device."""
    return root_row(name), row["params"], device_of(row["machine"])


def retime_covers(rows, timing):
    """Whether ``timing`` (``--retime``: one interleaved pass) timed the chosen variant of every
    row that has a timing, on its device: only then does the table take its values, since a
    pass of many models interleaved and a run's own pass of two (its model and the yardstick)
    are different settings, and their ratios differ by more than the rows do (DeepForest,
    2026-12-03: MimicDet 1.66 in the pass against 1.39-1.58 in its runs' own)."""
    timed = [n for n, row in rows.items() if row["infer_ratios"] or row["infer_ms"] is not None]
    if not timing or not timing.get("yardstick_ms") or not timed:
        return False
    return all(retimed_as_is(rows[name], timing["rows"].get(name), timing) for name in timed)


def retimed_as_is(row, retimed, timing):
    """Whether ``retimed`` (a --retime pass's entry for ``row``, or None) timed the row's chosen
    variant on the row's kind of device."""
    return bool(
        retimed
        and retimed["variant"] == row["variant"]
        and device_of(timing["machine"]) == device_of(row["machine"])
    )


def normalize_inference(rows, timing=None):
    """
    Puts every row's inference on one scale: the median, over every run of its deploy network
    (:func:`deploy_network`: MimicDet and its ablations, RetinaNet and its distilled students),
    of the run's ms divided by the yardstick's ms timed interleaved with it
    (``infer_vs_yardstick``), times the median yardstick of the table's rows on the same kind of
    device. A network's runs come from different sittings and machines; one network timed as
    several would show their noise as differences (DeepForest's four RetinaNet runs, trained
    apart: 1.64-2.08 times the yardstick), though the weights matter little (a trained
    checkpoint's network timed at initial weights beside it in one process took -1% to +8%
    longer: tools/timing_weights_check.py).
    ``infer_runs`` counts the runs pooled, ``infer_spread`` is their (min, max) over the median.
    A ``timing`` of ``--retime`` that timed every row (:func:`retime_covers`) replaces all of
    it, ``infer_retimed`` True. A row whose network has no run timed with the yardstick keeps
    its first seed's raw ms, and ``infer_normalized`` False says so.
    """
    retimed = retime_covers(rows, timing)
    pooled = {}
    for name, row in rows.items():
        pooled.setdefault(deploy_network(name, row), []).extend(row["infer_ratios"])
    for name, row in rows.items():
        row["infer_retimed"] = retimed and retimed_as_is(row, timing["rows"].get(name), timing)
        if row["infer_retimed"]:  # a row the pass missed has no timing at all
            row["infer_ms"] = timing["rows"][name]["infer_ms"]
            row["yardstick_ms"] = timing["yardstick_ms"]
            row["infer_vs_yardstick"] = row["infer_ms"] / row["yardstick_ms"]
            row["infer_runs"], row["infer_spread"] = 1, None
            continue
        # a row without a timed run of its own (raw ms) takes its network's, if it has one
        ratios = pooled.get(deploy_network(name, row), [])
        median = statistics.median(ratios) if ratios else None
        row["infer_vs_yardstick"] = median
        row["infer_runs"] = len(ratios)
        row["infer_spread"] = (min(ratios) / median, max(ratios) / median) if ratios else None
    references = {}
    for row in rows.values():
        if row["infer_vs_yardstick"] is not None and row["yardstick_ms"]:
            references.setdefault(device_of(row["machine"]), []).append(row["yardstick_ms"])
    references = {device: statistics.median(ms) for device, ms in references.items()}
    for row in rows.values():
        row["infer_normalized"] = row["infer_vs_yardstick"] is not None
        if row["infer_normalized"]:
            reference = references[device_of(row["machine"])]
            row["infer_ms"] = row["infer_vs_yardstick"] * reference
    return references


def timing_spread(rows):
    """The widest spread, over the table's deploy networks timed in at least three runs, of
    those runs' ratios to the yardstick around their median: (low, high), or None."""
    spreads = [r["infer_spread"] for r in rows.values() if r.get("infer_runs", 0) >= 3]
    spreads = [s for s in spreads if s is not None]
    if not spreads:
        return None
    return min(s[0] for s in spreads), max(s[1] for s in spreads)


def apply_train_timing(rows, train_timing=None):
    """
    Puts every row's training step on one scale: the seconds per step of ``train_timing``
    (``--retime-training``: every chosen row timed interleaved in one process) replace the mean
    of the row's trainings, which ran in different sittings under different load, where it timed
    the row's variant; ``train_retimed`` says which rows it replaced.
    """
    for name, row in rows.items():
        retimed = (train_timing or {}).get("rows", {}).get(name)
        row["train_retimed"] = bool(retimed and retimed["variant"] == row["variant"])
        if row["train_retimed"]:
            row["train_s_per_iter"] = retimed["train_s_per_iter"]


# the goals, in the paper's directions: (label, row, other row, minimum AP difference)
AP_TARGETS = (
    ("MimicDet at least 2 AP above FCOS", "mimicdet", "fcos", 2.0),
    ("MimicDet at least 2 AP above RetinaNet + FGFI", "mimicdet", "retinanet_fgfi", 2.0),
    ("MimicDet at least 2 AP above RetinaNet + DeFeat", "mimicdet", "retinanet_defeat", 2.0),
    ("MimicDet at least 2 AP above RetinaNet + RM + PFI", "mimicdet", "retinanet_rm_pfi", 2.0),
    ("MimicDet within 1 AP of Faster R-CNN", "mimicdet", "faster_rcnn", -1.0),
    ("mimicking worth at least 1 AP", "mimicdet", "mimicdet_nomimic", 1.0),
    ("dual path at least as good as cls only", "mimicdet", "mimicdet_cls_only", 0.0),
    ("dual path at least as good as reg only", "mimicdet", "mimicdet_reg_only", 0.0),
    ("staggered at least as good as same level", "mimicdet", "mimicdet_same_level", 0.0),
    ("shared backbone at least as good as separate", "mimicdet", "mimicdet_separate", 0.0),
)
# MimicDet's inference at most this fraction of Faster R-CNN's
SPEED_TARGET = 0.8


def targets(rows, dataset):
    """
    Where each goal stands on one dataset: ``met``, ``not met``, ``pending`` while a row has
    no result or did not learn, or ``not applicable`` where its row cannot run on the dataset.
    A met or not met goal carries ``measured``, the difference (or ratio) alone, and ``detail``,
    which adds the two values compared.
    ``provisional`` when a row involved has only its tuning run, or fewer reported seeds that
    learned than it is due (``Row.seeds``): one seed's evaluations move by more than some
    margins, and a seed that failed adds nothing to the mean.
    """
    out = []

    def learned_seeds(name):
        return len(rows[name]["seeds"]) - len(rows[name]["did_not_learn"])

    def provisional(*names):
        return any(rows[n]["tuning_run_only"] or learned_seeds(n) < ROWS[n].seeds for n in names)

    for label, row, other, margin in AP_TARGETS:
        if dataset not in ROWS[other].datasets:  # a method that cannot apply there
            detail = f"{ROWS[other].title} does not run on this dataset"
            out.append({"target": label, "status": "not applicable", "detail": detail})
            continue
        missing = [n for n in (row, other) if n not in rows]
        if missing:
            out.append({"target": label, "status": "pending", "detail": f"no run yet: {missing}"})
            continue
        failed = [n for n in (row, other) if rows[n]["AP"] is None]
        if failed:
            # a row whose every reported seed failed: a finding to explain, not a comparison
            detail = f"did not learn: {failed}"
            out.append({"target": label, "status": "pending", "detail": detail})
            continue
        diff = rows[row]["AP"] - rows[other]["AP"]
        # as many decimals as it takes for the shown difference to be met exactly when the real
        # one is (one decimal would read "+2.0 ... not met" for 1.96)
        digits = 1
        while digits < 4 and (round(diff, digits) >= margin) != (diff >= margin):
            digits += 1
        measured = f"{diff:+.{digits}f} AP"
        out.append(
            {
                "target": label,
                "status": "met" if diff >= margin else "not met",
                "measured": measured,
                "detail": f"{measured} ({rows[row]['AP']:.{digits}f} vs "
                f"{rows[other]['AP']:.{digits}f})",
                "provisional": provisional(row, other),
            }
        )
    out.append(speed_target(rows, provisional))
    return out


def speed_target(rows, provisional):
    """MimicDet's inference against Faster R-CNN's: only on one scale (both yardstick-normalized)
    and one kind of device, else pending."""
    label = f"MimicDet at most {SPEED_TARGET:g}x Faster R-CNN's inference time"
    pair = [rows.get(n) for n in ("mimicdet", "faster_rcnn")]
    if not all(r and r.get("infer_ms") for r in pair):
        return {"target": label, "status": "pending", "detail": "not timed yet"}
    if not all(r["infer_normalized"] for r in pair):
        return {"target": label, "status": "pending", "detail": "a row timed without yardstick"}
    devices = {device_of(r["machine"]) for r in pair}
    if len(devices) > 1:
        return {"target": label, "status": "pending", "detail": f"timed on {sorted(devices)}"}
    ratio = pair[0]["infer_ms"] / pair[1]["infer_ms"]
    measured = f"{ratio:.2f}x on {devices.pop()}"
    return {
        "target": label,
        "status": "met" if ratio <= SPEED_TARGET else "not met",
        "measured": measured,
        "detail": measured,
        "provisional": provisional("mimicdet", "faster_rcnn"),
    }


def sweep_table(runs):
    """{tuned row: {variant: seed-0 AP}}."""
    return {
        name: {
            v: seeds[0]["final"].get("AP") for v, seeds in sorted(variants.items()) if 0 in seeds
        }
        for name, variants in runs.items()
        if ROWS[name].parent is None
    }


def _fmt(value, digits=1):
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(
    dataset, rows, sweeps, date, timing, references, goals, train_timing=None, max_iter=None
):
    spec = DATASETS[dataset]
    max_iter = max_iter or spec.max_iter  # the schedule reported (a smoke run's is shorter)
    scale = ", ".join(f"{ms:.0f} ms on {device}" for device, ms in references.items())
    timed = (
        "inference: the deploy model at batch 1 after its training, timed image by image "
        "interleaved with a yardstick (the shared MobileNetV2-FPN backbone alone); a row shows "
        "the median ratio of the two over every run of its deploy network (an ablation's or a "
        "distilled student's change is training-only, so it shares its parent's network and "
        "time) times the yardstick's median over this table "
        f"({scale or 'none yet'}), so that runs timed in different sittings compare"
    )
    spread = timing_spread(rows)
    if spread:
        timed += (
            f"; runs of one network spread from {spread[0] - 1:+.0%} to {spread[1] - 1:+.0%} "
            "around its median"
        )
    timed += "; † raw ms, timed without the yardstick"
    if any(r.get("infer_retimed") for r in rows.values()):
        timed += (
            f"; * re-timed: every row in one interleaved pass on {timing['machine']}, "
            f"{timing['date']} (`python tools/benchmark.py --retime`)"
        )
    timed += (
        "; train s/iter: median step after warm-up, ‡ where another process had more than "
        f"{1 - CONTENDED_SHARE:.0%} of the machine's CPU time during the training (or it was "
        "not recorded)"
    )
    if train_timing:
        timed += (
            f"; § re-timed: median of {train_timing['timed_steps']} steps of each row "
            f"interleaved in one process on {train_timing['machine']}, {train_timing['date']} "
            f"(`python tools/benchmark.py --retime-training`; the quartiles are in "
            f"`runs/{dataset}/train_timing.json`)"
        )
    lines = [
        f"# {spec.title}",
        "",
        f"Runs: `python tools/benchmark.py --dataset {dataset}` (each run's train_net command, "
        f"machine and date are in its JSON under `benchmarks/runs/{dataset}/`); this table: "
        f"`python tools/benchmark.py --report` over the runs up to {date}. Every row: the same "
        f"MobileNetV2 FPN, data, batch 2 and {max_iter} iterations; val AP by detectron2's "
        "COCOEvaluator, means over the reported seeds (1..n) that learned; seed 0 of each "
        f"detector is its tuning run, chosen on val, shown in the tuning table only; {timed}.",
        "",
        "| row | AP | AP50 | AP75 | AP_s | AP_m | AP_l | AP per seed | train s/iter "
        "| infer ms/img | params (M) | GFLOPs | variant |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    machines = {machine_model(r["machine"]) for r in rows.values()}
    for name, r in rows.items():
        seed_machines = r["machine_per_seed"]
        one_machine = len(set(seed_machines)) == 1
        if len(machines) > 1 and not one_machine:
            # where a row's seeds did not all train on one machine, each run of seeds names its own
            runs = itertools.groupby(zip(r["AP_per_seed"], seed_machines), key=lambda x: x[1])
            per_seed = "; ".join(
                ", ".join(_fmt(a) for a, _ in group) + f" on {m}" for m, group in runs
            )
        else:
            per_seed = ", ".join(_fmt(a) for a in r["AP_per_seed"])
        per_seed += " (tuning run only)" if r["tuning_run_only"] else ""
        if r["did_not_learn"]:
            per_seed += f" (seed {', '.join(map(str, r['did_not_learn']))} did not learn)"
        if len(machines) > 1 and one_machine:
            per_seed += f" on {r['machine']}"
        params = None if r["params"] is None else r["params"] / 1e6
        variant = r["variant"] + ("" if r["sweep_complete"] else " (sweep incomplete)")
        infer = _fmt(r["infer_ms"], 0) + ("*" if r.get("infer_retimed") else "")
        infer += "" if r["infer_normalized"] else "†"
        train = _fmt(r["train_s_per_iter"], 2) + ("§" if r.get("train_retimed") else "")
        train += "" if train_timing_clean(r) else "‡"
        lines.append(
            f"| {r['title']} | "
            + " | ".join(_fmt(r[k]) for k in COLUMNS)
            + f" | {per_seed} | {train} | {infer} "
            f"| {_fmt(params, 2)} | {_fmt(r['gflops'])} | {variant} |"
        )
    lines += [
        "",
        "Targets (the benchmark issue's goals; provisional: a row has its tuning run only, or"
        " fewer seeds that learned than it is due):",
    ]
    lines += ["", "| target | status | measured |", "|---|---|---|"]
    for goal in goals:
        status = goal["status"] + (" (provisional)" if goal.get("provisional") else "")
        lines.append(f"| {goal['target']} | {status} | {goal['detail']} |")
    lines += heads_table(rows)
    if sweeps:
        lines += ["", "Tuning (seed 0, final val AP of each variant):", ""]
        lines += ["| detector | " + " | ".join(["variant: AP"]) + " |", "|---|---|"]
        for name, variants in sweeps.items():
            cells = ", ".join(f"{v}: {_fmt(ap)}" for v, ap in variants.items())
            lines.append(f"| {ROWS[name].title} | {cells} |")
    return "\n".join(lines) + "\n"


def signed(value, digits=1):
    return "n/a" if value is None else f"{value:+.{digits}f}"


def heads_table(rows):
    """Markdown lines comparing each MimicDet row's two heads, or none if no row has both."""
    paired = {name: r["heads"] for name, r in rows.items() if r.get("heads")}
    if not paired:
        return []
    lines = [
        "",
        "MimicDet's two heads: the deployed S-head, and the T-head that trains beside it and is "
        "dropped at inference, run as a two-stage detector on the same checkpoint's refined boxes "
        "(`tools/evaluate_teacher.py --mixed`, the same val split and COCOEvaluator). T - S is "
        "what mimicking has left to transfer. The mixed columns score one head's classes on the "
        "other head's boxes; in brackets, their gain over the S-head of the same runs: what the "
        "S-head's classification (T classes on S boxes) and its localization (S classes on T "
        "boxes) lose to the T-head's. Means over the seeds named:",
        "",
        "| row | seeds | S-head AP | T-head AP | T - S | T classes on S boxes "
        "| S classes on T boxes | S-head AP_s / AP_m / AP_l | T-head AP_s / AP_m / AP_l |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, heads in paired.items():
        s_head, t_head = heads["s_head"], heads["t_head"]
        gap = None if None in (s_head["AP"], t_head["AP"]) else t_head["AP"] - s_head["AP"]
        sizes = [" / ".join(_fmt(h[k]) for k in ("APs", "APm", "APl")) for h in (s_head, t_head)]
        lines.append(
            f"| {rows[name]['title']} | {', '.join(map(str, heads['seeds']))} "
            f"| {_fmt(s_head['AP'])} | {_fmt(t_head['AP'])} | {signed(gap)} "
            f"| {' | '.join(mixed_cells(heads))} | {sizes[0]} | {sizes[1]} |"
        )
    return lines


def mixed_cells(heads):
    """The heads table's mixed columns: AP (gain over the S-head of the same runs), with the
    seeds named where they are not all the row's; "–" where no run was scored so."""
    mixed = heads["mixed"]
    if not mixed:
        return ["–"] * len(MIXED_HEADS)
    seeds = ""
    if mixed["seeds"] != heads["seeds"]:
        word = "seed" if len(mixed["seeds"]) == 1 else "seeds"
        seeds = f", {word} {', '.join(map(str, mixed['seeds']))}"
    cells = []
    for name in MIXED_HEADS:
        ap, s_ap = mixed[name], mixed["s_head_AP"]
        cells.append(f"{_fmt(ap)} ({signed(None if None in (ap, s_ap) else ap - s_ap)}{seeds})")
    return cells


def plot_curves(path, dataset, runs, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for index, (name, r) in enumerate(rows.items()):
        colour = plt.cm.tab20(index % 20)
        for seed_index, seed in enumerate(r["seeds"]):
            curve = runs[name][r["variant"]][seed]["curve"]
            if not curve:
                continue
            result = runs[name][r["variant"]][seed]
            # results written before the fix logged the final evaluation one iteration late
            iters, aps = zip(*[(min(c[0], result["max_iter"]), c[1]) for c in curve])
            label = r["title"] if seed_index == 0 else None
            ax.plot(iters, aps, color=colour, label=label, alpha=1.0 if seed_index == 0 else 0.5,
                    linestyle="-" if seed_index == 0 else "--")  # fmt: skip
    ax.set_xlabel("iteration")
    ax.set_ylabel("val AP (COCOEvaluator)")
    ax.set_title(f"{DATASETS[dataset].title}: AP vs iteration (dashed: further seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_tuning(path, dataset, runs):
    """One panel per tuned detector: the seed-0 curve of every variant its sweep tried."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tuned = [n for n in ROWS if ROWS[n].parent is None and n in runs]
    if not tuned:
        return
    width = max(6.5, 4 * len(tuned))  # room for the title with one panel
    fig, axes = plt.subplots(1, len(tuned), figsize=(width, 3.6), squeeze=False)
    for ax, name in zip(axes[0], tuned):
        for variant, seeds in sorted(runs[name].items()):
            if 0 not in seeds or not seeds[0]["curve"]:
                continue
            max_iter = seeds[0]["max_iter"]
            iters, aps = zip(*[(min(c[0], max_iter), c[1]) for c in seeds[0]["curve"]])
            ax.plot(iters, aps, label=variant)
        ax.set_title(ROWS[name].title, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("val AP (seed 0)")
    fig.suptitle(f"{DATASETS[dataset].title}: tuning sweeps", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_speed_accuracy(path, dataset, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    points = [r for r in rows.values() if r["infer_ms"] is not None and r["AP"] is not None]
    for r in points:
        ax.scatter(r["infer_ms"], r["AP"])
    ax.set_xlabel("inference ms per image (deploy model, batch 1; yardstick-normalized unless †)")
    ax.set_ylabel("val AP")
    ax.set_title(f"{DATASETS[dataset].title}: speed vs accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    # rows of about the same speed and AP (MimicDet's ablations) would print their labels over
    # each other: from the highest AP down, a label drops below any close one
    placed = []  # (x, label's y) in points
    for r in sorted(points, key=lambda r: -r["AP"]):
        pixels = ax.transData.transform((r["infer_ms"], r["AP"]))
        x, y = pixels * 72 / fig.dpi
        label_y = y + 2
        for other_x, other_y in sorted(placed, key=lambda point: -point[1]):
            if abs(other_x - x) < 100 and abs(label_y - other_y) < 8:
                label_y = other_y - 8
        placed.append((x, label_y))
        label = r["title"] + ("" if r.get("infer_normalized") else " † raw ms")
        # on the axes' right side a label reads leftwards, so that it stays inside the figure
        right = ax.transAxes.inverted().transform(pixels)[0]
        ax.annotate(label, (r["infer_ms"], r["AP"]), fontsize=7, textcoords="offset points",
                    xytext=(-4 if right > 0.7 else 4, label_y - y),
                    ha="right" if right > 0.7 else "left")  # fmt: skip
    fig.savefig(path, dpi=100)
    plt.close(fig)


README_START, README_END = "<!-- benchmark-table -->", "<!-- /benchmark-table -->"


def short_title(dataset):
    """The dataset's title without its parenthesis: "DeepForest", "Fashion scenes"."""
    return DATASETS[dataset].title.split(" (")[0]


def readme_table(summary):
    """The README's headline: one table, a line per row and a column per dataset (AP and AP50),
    with the inference time on the first dataset, the command, the date and one plot. Every row
    is listed, "–" where it has no run yet, "none learned" where no run of it learned."""
    datasets = list(summary["datasets"])
    if not datasets:
        return "No benchmark run is committed yet: `python tools/benchmark.py`."
    first = datasets[0]
    table, used = [], set()  # the marks the table uses: only they are explained
    for name in ROWS:
        cells, ms = [], None
        for dataset in datasets:
            r = summary["datasets"][dataset]["rows"].get(name)
            if dataset not in ROWS[name].datasets:
                cells.append("n/a")
                continue
            if r is None:
                cells.append("–")
                continue
            if r["AP"] is None:  # runs, none of which learned: the tables say which
                cells.append("none learned")
                continue
            mark = "*" if r["tuning_run_only"] else ""
            cells.append(f"{_fmt(r['AP'])} ({_fmt(r['AP50'])}){mark}")
            if dataset == first:
                ms = _fmt(r["infer_ms"], 0) + ("" if r["infer_normalized"] else "†")
                ms += "" if device_of(r["machine"]) == "CPU" else f" ({device_of(r['machine'])})"
        # a row with no run yet stays listed: the table names every row the benchmark has
        used |= {m for m in ("*", "†") if any(m in c for c in cells + [ms or ""])}
        used |= {c for c in cells if c in ("–", "n/a", "none learned")}
        table.append(f"| {ROWS[name].title} | " + " | ".join(cells) + f" | {ms or '–'} |")
    legend = {
        "*": "* only the tuning run (seed 0) so far",
        "–": "–: not run yet",
        "n/a": "n/a: the row does not run on that dataset",
        "none learned": "none learned: its runs so far did not learn (the dataset's table names"
        " them)",
    }
    lines = [
        f"`python tools/benchmark.py --report`, {summary['date']}, from the runs committed under "
        "`benchmarks/runs/`: val AP (AP50), mean of the reported seeds that learned (the "
        "dataset's report names any that did not), at batch 2 for "
        + ", ".join(
            f"{summary['datasets'][d]['max_iter']} iterations on {short_title(d)}" for d in datasets
        )
        + "".join(f"; {text}" for mark, text in legend.items() if mark in used)
        + f"; ms: deploy model, batch 1, {short_title(first)}, on the CPU unless marked, scaled "
        "by a backbone-only yardstick timed beside it so that runs of different days compare; a "
        "row that changes only the training (an ablation, a distilled student) shares its "
        "parent's network and time"
        + (" († raw: timed before that scale existed)" if "†" in used else "")
        + ".",
        "",
        "| detector | " + " | ".join(short_title(d) for d in datasets) + " | ms/img |",
        "|---" * (len(datasets) + 2) + "|",
        *table,
    ]
    lines += ["", *readme_targets(summary)]
    lines += ["", f"![AP vs iteration, {first}](benchmarks/{first}_ap_curves.png)"]
    return "\n".join(lines)


def readme_targets(summary):
    """The README's second table: where each of the benchmark's targets stands on each dataset, the
    status and the measured difference (the dataset's report has the two values compared)."""
    datasets = list(summary["datasets"])
    by_dataset = {d: {g["target"]: g for g in summary["datasets"][d]["targets"]} for d in datasets}
    labels = list(dict.fromkeys(g for d in datasets for g in by_dataset[d]))

    def cell(goal):
        if goal is None or goal["status"] == "pending":
            return "pending"
        if goal["status"] == "not applicable":
            return "n/a"
        provisional = " (provisional)" if goal.get("provisional") else ""
        return f"{goal['status']}{provisional}: {goal['measured']}"

    lines = [
        "The benchmark's targets, MimicDet against the row named (provisional: a row compared "
        "has fewer reported seeds that learned than planned, or only its tuning run; each "
        "dataset's report under `benchmarks/` gives the values compared):",
        "",
        "| target | " + " | ".join(short_title(d) for d in datasets) + " |",
        "|---" * (len(datasets) + 1) + "|",
    ]
    for label in labels:
        cells = [cell(by_dataset[d].get(label)) for d in datasets]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def replace_between_markers(path, start, end, text):
    """Replaces what lies between the ``start`` and ``end`` marker lines of ``path`` with
    ``text``; the rest of the file stays as it is."""
    content = Path(path).read_text()
    if start not in content or end not in content:
        raise ValueError(f"{path} has no {start} ... {end} markers")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    Path(path).write_text(f"{head}{start}\n{text}\n{end}{tail}")


def update_readme(readme, summary):
    """Replaces the text between the README's benchmark markers with :func:`readme_table`."""
    replace_between_markers(readme, README_START, README_END, readme_table(summary))


ZOO_START, ZOO_END = "<!-- benchmark-models -->", "<!-- /benchmark-models -->"


def model_zoo_section(runs_by_dataset, date):
    """
    MODEL_ZOO.md's benchmark part: every run of each row's chosen variant that recorded its
    checkpoints' digests (the reported seeds, and the tuning run, seed 0, until they exist), a
    table line each, then the digests in ``sha256sum -c`` form.
    """
    lines = [
        f"`python tools/benchmark.py --report`, {date}. Each model is the chosen variant of its "
        "row, trained by the command in its result file (`benchmarks/runs/<dataset>/<row>/"
        "<variant>-seed<k>.json`, key `command`, which writes into `output/benchmark/`) on the "
        "device named; seed 0 is the tuning run that chose the variant; inference: the deploy "
        "model, batch 1, raw ms of its sitting. No weights are in git: the digests name the files "
        "a published copy must match.",
        "",
        "| model | dataset | config | variant | seed | iterations | AP | AP50 | device "
        "| train s/iter | infer ms/img | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    digests = []
    for dataset, runs in runs_by_dataset.items():
        for name in ROWS:
            variant, _ = chosen_variant(runs, name)
            seeds = runs.get(name, {}).get(variant, {}) if variant else {}
            # the tuning run stands in until a reported seed exists
            seeds = {k: r for k, r in seeds.items() if k >= 1} or seeds
            for seed, r in sorted(seeds.items()):
                if not r.get("sha256"):
                    continue
                stem = f"runs/{dataset}/{name}/{variant}-seed{seed}"
                lines.append(
                    f"| {ROWS[name].title} | {dataset} | `{r['config']}` | {variant} | {seed} "
                    f"| {r['max_iter']} | {_fmt(r['final'].get('AP'))} "
                    f"| {_fmt(r['final'].get('AP50'))} | {device_of(r.get('machine'))} "
                    f"| {_fmt(r['train_s_per_iter'], 2)} "
                    f"| {_fmt(r.get('infer_ms'), 0)} | [json](benchmarks/{stem}.json) |"
                )
                folder = f"output/benchmark/{dataset}/{name}/{variant}-seed{seed}"
                digests += [f"{digest}  {folder}/{file}" for file, digest in r["sha256"].items()]
    if not digests:
        lines.append("| no chosen run with recorded digests yet | | | | | | | | | | | |")
    lines += ["", "```", *digests, "```"] if digests else []
    return "\n".join(lines)


def update_model_zoo(path, runs_by_dataset, date):
    """Replaces the text between MODEL_ZOO.md's benchmark markers."""
    section = model_zoo_section(runs_by_dataset, date)
    replace_between_markers(path, ZOO_START, ZOO_END, section)


def read_json_if_any(path):
    """The JSON in ``path``, or None where there is no such file."""
    return json.loads(path.read_text()) if path.is_file() else None


def write_report(results, date=None, readme=None, model_zoo=None, max_iters=None):
    """Writes the report files for every dataset with committed runs of its schedule
    (``max_iters``, {dataset: iterations}; by default benchmark_rows.DATASETS') and the table in
    ``readme`` and the models in ``model_zoo``, if given; returns the summary. Each file is dated
    by the newest run or timing it reports (``date`` where there is none, and for the README and
    MODEL_ZOO.md where it is given), so that writing the report again over the same runs changes
    no file: the benchmark writes it after every stage, and a stage that finds its runs done
    must leave the working tree as it was."""
    import datetime

    results = Path(results)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    max_iters = max_iters or {name: d.max_iter for name, d in DATASETS.items()}
    all_runs = load_runs(results, max_iters)
    summary = {"command": "python tools/benchmark.py --report", "date": date, "datasets": {}}
    dataset_dates = []
    for dataset, runs in all_runs.items():
        rows = {n: s for n in ROWS if n in runs and (s := summarize(runs, n)) is not None}
        # the re-timing passes (--retime, --retime-training), where they ran
        timing = read_json_if_any(results / "runs" / dataset / "timing.json")
        references = normalize_inference(rows, timing)
        train_timing = read_json_if_any(results / "runs" / dataset / "train_timing.json")
        apply_train_timing(rows, train_timing)
        sweeps = sweep_table(runs)
        goals = targets(rows, dataset)
        summary["datasets"][dataset] = {
            "max_iter": max_iters[dataset],
            "rows": rows,
            "sweeps": sweeps,
            "targets": goals,
            "timing": timing,
            "train_timing": train_timing,
            "yardstick_ms": references,
        }
        # dated by its newest run or timing, so that another dataset's run leaves it unchanged
        dates = [r.get("date") for v in runs.values() for s in v.values() for r in s.values()]
        dates += [(t or {}).get("date") for t in (timing, train_timing)]
        dataset_date = max([d for d in dates if d], default=date or now)
        dataset_dates.append(dataset_date)
        (results / f"{dataset}.md").write_text(
            markdown(
                dataset, rows, sweeps, dataset_date, timing, references, goals, train_timing,
                max_iters[dataset],
            )  # fmt: skip
        )
        plot_curves(results / f"{dataset}_ap_curves.png", dataset, runs, rows)
        plot_speed_accuracy(results / f"{dataset}_speed_accuracy.png", dataset, rows)
        plot_tuning(results / f"{dataset}_tuning_curves.png", dataset, runs)
    summary["date"] = date or max(dataset_dates, default=now)
    summary = json.loads(json.dumps(summary), parse_constant=lambda constant: None)  # nan: null
    results.mkdir(parents=True, exist_ok=True)  # a time-boxed GPU run may have finished none
    (results / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    if readme is not None:
        update_readme(readme, summary)
    if model_zoo is not None:
        update_model_zoo(model_zoo, all_runs, summary["date"])
    return summary
