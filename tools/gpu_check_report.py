#!/usr/bin/env python
"""Writes and validates the one JSON report of ``tools/gpu_check.sh``.

Reads the script's step table (tab-separated: name, status, exit code, seconds, time limit,
description), each step's log, and the files the steps left in the output folder
(``deform_conv_gpu.json``, ``coco_cost_gpu.json``, ``benchmark_runs.json``). Writes the report
even when it is incomplete, then exits 1 if it breaks the schema that :func:`validate` checks, so
a broken step plumbing fails the dry run in CI rather than on the GPU machine.

Needs only the standard library: it must run even where torch does not import.
"""

import argparse
import json
import math
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

SCHEMA_VERSION = 1
# The steps of tools/gpu_check.sh, in the order it runs them.
STEPS = (
    "env",
    "install",
    "build",
    "data",
    "cuda_tests",
    "bench",
    "coco_cost",
    "benchmark",
    "layer_tests",
)
STATUSES = (
    "ok",
    "failed",
    "timed out",
    "skipped (dry run)",
    "skipped (no time left)",
    "skipped (not selected)",
)
# Steps that have no CPU stand-in; a dry run must record them as skipped.
GPU_ONLY = ("layer_tests",)
VERSION_KEYS = ("python", "torch", "torchvision", "cuda", "nvcc", "cudnn")
BENCH_ROW_KEYS = ("shape", "dtype", "op", "fwd_ms", "fwd_bwd_ms", "fwd_vs_torchvision")
LOG_TAIL_CHARS = 3000
PYTEST_COUNT = re.compile(
    r"(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|errors?|warnings?)\b"
)


def read_steps(table):
    steps = []
    for line in Path(table).read_text().splitlines():
        name, status, exit_code, seconds, limit, description = line.split("\t")
        steps.append(
            {
                "name": name,
                "description": description,
                "status": status,
                "exit_code": int(exit_code) if exit_code else None,
                "duration_s": float(seconds),
                "timeout_s": int(limit) if limit else None,
            }
        )
    return steps


def pytest_counts(log):
    """Counts from pytest's last summary line ("3 passed, 2 skipped in 1.2s"), or None."""
    for line in reversed(log.splitlines()):
        if re.search(r"\bin [\d.]+s\b", line) and PYTEST_COUNT.search(line):
            plural = {"error": "errors", "warning": "warnings"}
            return {plural.get(kind, kind): int(n) for n, kind in PYTEST_COUNT.findall(line)}
    return None


def tagged_json(log, tag):
    for line in log.splitlines():
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1 :])
    return None


def load_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def build_numbers(step, log):
    match = re.search(r"^BUILT library=(\S+) cuda_kernel=(True|False)$", log, re.MULTILINE)
    if match is None:
        return None
    # the dry run checks the library it finds but builds nothing, so it has no build time
    built = step["status"] == "ok" and "setup.py build_ext" in log
    return {
        "seconds": step["duration_s"] if built else None,
        "library": match.group(1),
        "cuda_kernel": match.group(2) == "True",
    }


def benchmark_numbers(packed_file):
    """Each run of tools/benchmark.py's ``--pack`` file, in short: name, final AP and AP50, the
    T-head's AP, seconds per iteration, inference ms and wall time (the whole results come back
    beside it)."""
    packed = load_json(packed_file)
    if packed is None:
        return None
    runs = []
    for name, result in sorted((packed.get("runs") or {}).items()):
        final = result.get("final") or {}
        runs.append(
            {
                "run": name,
                "max_iter": result.get("max_iter"),
                "AP": final.get("AP"),
                "AP50": final.get("AP50"),
                # MimicDet's T-head scored as a detector (None for other rows)
                "t_head_AP": (result.get("t_head_final") or {}).get("AP"),
                "train_s_per_iter": result.get("train_s_per_iter"),
                "infer_ms": result.get("infer_ms"),
                "wall_s": result.get("wall_s"),
            }
        )
    return {"file": Path(packed_file).name, "runs": runs}


def git_state(repo):
    def git(*args):
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10
        )

    try:
        commit, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain")
    except (OSError, subprocess.TimeoutExpired):
        return None
    if commit.returncode != 0:  # the GPU machine's copy of the tree may have no .git
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def assemble(args):
    logs = Path(args.logs)
    out_dir = Path(args.out_dir)
    steps = read_steps(args.steps)
    texts = {}
    for step in steps:
        log_file = logs / f"{step['name']}.log"
        text = log_file.read_text(errors="replace") if log_file.exists() else ""
        texts[step["name"]] = text
        ran = not step["status"].startswith("skipped")
        step["ran"] = ("gpu" if args.mode == "gpu" else "cpu stand-in") if ran else None
        step["commands"] = [line[2:] for line in text.splitlines() if line.startswith("+ ")]
        step["log_tail"] = text[-LOG_TAIL_CHARS:]
    by_name = {step["name"]: step for step in steps}

    env = tagged_json(texts.get("env", ""), "GPU_CHECK_ENV") or {}
    results = {
        "build": build_numbers(by_name["build"], texts["build"]) if "build" in by_name else None,
        "cuda_tests": pytest_counts(texts.get("cuda_tests", "")),
        "layer_tests": pytest_counts(texts.get("layer_tests", "")),
        "deform_conv": load_json(out_dir / "deform_conv_gpu.json"),
        "coco_cost": load_json(out_dir / "coco_cost_gpu.json"),
        "benchmark": benchmark_numbers(out_dir / "benchmark_runs.json"),
    }
    now = datetime.now(timezone.utc)
    started = datetime.fromtimestamp(args.started, timezone.utc)
    summary = {status: 0 for status in ("ok", "failed", "timed out", "skipped")}
    for step in steps:
        summary["skipped" if step["status"].startswith("skipped") else step["status"]] += 1
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "tools/gpu_check.sh",
        "mode": args.mode,
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round((now - started).total_seconds(), 1),
        "budget_s": args.budget,
        "gpu_name": (env.get("gpu") or {}).get("name"),
        "versions": {k: env.get(k) for k in VERSION_KEYS},
        "env": env,
        "git": git_state(Path(__file__).resolve().parents[1]),
        "summary": summary,
        "steps": steps,
        "results": results,
        "files": sorted(p.name for p in out_dir.iterdir() if p.is_file()),
    }


def finite(value):
    """``value`` with every NaN or infinity replaced by None (strict JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def _check(problems, condition, message):
    if not condition:
        problems.append(message)


def validate(report):
    """Returns the ways ``report`` breaks the schema (empty if it is valid)."""
    problems = []
    for key, kind in [
        ("schema_version", int),
        ("mode", str),
        ("date", str),
        ("duration_s", (int, float)),
        ("budget_s", int),
        ("versions", dict),
        ("env", dict),
        ("summary", dict),
        ("steps", list),
        ("results", dict),
        ("files", list),
    ]:
        _check(problems, isinstance(report.get(key), kind), f"{key}: not a {kind}")
    if problems:
        return problems
    mode = report["mode"]
    _check(problems, mode in ("gpu", "dry-run"), f"mode: {mode!r}")
    names = [step.get("name") for step in report["steps"]]
    _check(problems, tuple(names) == STEPS, f"steps: {names}, expected {list(STEPS)}")
    for step in report["steps"]:
        name, status = step.get("name"), step.get("status")
        _check(problems, status in STATUSES, f"{name}: status {status!r}")
        for key in ("description", "log_tail"):
            _check(problems, isinstance(step.get(key), str), f"{name}: {key} is not a string")
        _check(problems, isinstance(step.get("duration_s"), float), f"{name}: duration_s")
        if status == "ok":
            _check(problems, step.get("exit_code") == 0, f"{name}: ok with a non-zero exit code")
        if status in ("failed", "timed out"):
            _check(problems, step.get("exit_code") not in (0, None), f"{name}: {status}, exit 0")
        if mode == "gpu":
            _check(problems, status != "skipped (dry run)", f"{name}: dry-run status on the GPU")
        elif name in GPU_ONLY:
            _check(problems, status.startswith("skipped"), f"{name}: GPU-only, ran in a dry run")
    if mode == "gpu" and report["steps"] and report["steps"][0]["status"] == "ok":
        _check(problems, report["gpu_name"] is not None, "gpu_name: missing after the env step")
    if report["steps"] and report["steps"][0]["status"] == "ok":
        for key in ("python", "torch", "torchvision"):
            _check(problems, report["versions"].get(key) is not None, f"versions.{key}: missing")
    results = report["results"]
    expected = {"build", "cuda_tests", "layer_tests", "deform_conv", "coco_cost", "benchmark"}
    _check(problems, set(results) == expected, f"results: keys {sorted(results)}")
    status = {step["name"]: step["status"] for step in report["steps"]}
    # a step that succeeded must have left its numbers
    if status.get("cuda_tests") == "ok":
        counts = results.get("cuda_tests") or {}
        _check(problems, sum(counts.values()) > 0, "results.cuda_tests: no pytest counts")
    if status.get("layer_tests") == "ok":
        _check(problems, bool(results.get("layer_tests")), "results.layer_tests: no counts")
    if status.get("build") == "ok":
        build = results.get("build") or {}
        _check(problems, "cuda_kernel" in build, "results.build: no library line")
    if status.get("bench") == "ok":
        rows = (results.get("deform_conv") or {}).get("rows") or []
        _check(problems, bool(rows), "results.deform_conv: no rows")
        for row in rows:
            missing = [k for k in BENCH_ROW_KEYS if k not in row]
            _check(problems, not missing, f"results.deform_conv row lacks {missing}")
    if status.get("coco_cost") == "ok":
        _check(problems, results.get("coco_cost") is not None, "results.coco_cost: no JSON")
    if status.get("benchmark") == "ok":
        runs = (results.get("benchmark") or {}).get("runs") or []
        _check(problems, bool(runs), "results.benchmark: no finished run")
        for run in runs:
            speed = run.get("train_s_per_iter")
            _check(problems, isinstance(speed, (int, float)), f"benchmark {run.get('run')}: s/it")
    return problems


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", required=True, choices=["gpu", "dry-run"])
    parser.add_argument("--steps", required=True, help="the step table gpu_check.sh wrote")
    parser.add_argument("--logs", required=True, help="folder of <step>.log files")
    parser.add_argument("--out-dir", required=True, help="folder of the steps' output files")
    parser.add_argument("--budget", type=int, required=True, help="the run's time budget (s)")
    parser.add_argument("--started", type=float, required=True, help="start, seconds since epoch")
    parser.add_argument("--out", required=True, help="report path")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # strict JSON: a NaN from another tool's file would make the report unreadable elsewhere
    report = finite(assemble(args))
    problems = validate(report)
    report["valid"] = not problems
    report["problems"] = problems
    Path(args.out).write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    width = max(len(name) for name in STEPS)
    for step in report["steps"]:
        print(f"  {step['name']:<{width}}  {step['status']:<22} {step['duration_s']:6.1f} s")
    if problems:
        print(f"{args.out} breaks the report schema:\n  " + "\n  ".join(problems))
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
