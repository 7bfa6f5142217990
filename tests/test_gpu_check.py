"""tools/gpu_check.sh: its arguments, its report's schema, and a dry run of every step on the CPU.

The dry run is what CI can check of the GPU check: each step's command runs in a CPU stand-in form
and the report must come out valid, so a broken step fails here rather than on a lent GPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "tools"))

import gpu_check_report  # noqa: E402

STEPS = ["env", "install", "build", "data", "cuda_tests", "bench", "coco_cost", "benchmark"]
STEPS += ["layer_tests"]


def run_script(*args, timeout=60):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_names_the_three_modes():
    result = run_script("--help")
    assert result.returncode == 0, result.stderr
    for mode in ("--prepare", "--dry-run", "$OUT/gpu_check.json"):
        assert mode in result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--bogus"], "unknown argument '--bogus'"),
        (["--dry-run", "--only", "benchmark,nosuchstep"], "no step 'nosuchstep'"),
        (["--dry-run", "--budget", "soon"], "--budget needs a number"),
        (["--out"], "--out needs a path"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(args, message):
    result = run_script(*args)
    assert result.returncode == 2
    assert message in result.stderr


def test_report_tool_knows_the_scripts_steps():
    script = SCRIPT.read_text()
    assert f'STEPS="{" ".join(STEPS)}"' in script
    assert list(gpu_check_report.STEPS) == STEPS


def test_pytest_counts_read_the_summary_line():
    log = "....s\n=== 12 passed, 3 skipped, 140 deselected, 1 error, 2 warnings in 9.81s ===\n"
    counts = gpu_check_report.pytest_counts(log)
    assert counts == {"passed": 12, "skipped": 3, "deselected": 140, "errors": 1, "warnings": 2}
    assert gpu_check_report.pytest_counts("collected 0 items / 1 error\nInterrupted") is None


def test_validate_rejects_a_broken_report():
    step = {"name": "env", "status": "ok", "exit_code": 1, "duration_s": 1.0}
    step.update(description="", log_tail="")
    report = {
        "schema_version": 1,
        "mode": "dry-run",
        "date": "2026-01-01T00:00:00+00:00",
        "duration_s": 1.0,
        "budget_s": 60,
        "versions": {},
        "env": {},
        "summary": {},
        "steps": [step],
        "results": {},
        "files": [],
    }
    problems = " | ".join(gpu_check_report.validate(report))
    assert "steps: ['env']" in problems
    assert "env: ok with a non-zero exit code" in problems
    assert "versions.torch: missing" in problems
    assert "results: keys []" in problems


def test_benchmark_without_time_for_a_run_is_skipped_not_started(tmp_path):
    """A run cut by the deadline is lost, so a box shorter than one run starts none and the report
    says why, rather than failing or spending the time."""
    out = tmp_path / "out" / "gpu_check.json"
    result = run_script("--dry-run", "--only", "benchmark", "--budget", "60", "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    step = next(s for s in report["steps"] if s["name"] == "benchmark")
    assert step["status"] == "skipped (no time left)", step
    assert "--only install,build,data,benchmark" in step["log_tail"]
    assert not (out.parent / "benchmark_runs.json").exists()
    assert report["valid"], report.get("problems")


@pytest.mark.slow
def test_dry_run_runs_every_cpu_step_and_writes_a_valid_report(tmp_path):
    out = tmp_path / "out" / "gpu_check.json"
    # a budget no step can run out of, on a CPU shared with another test worker
    result = run_script("--dry-run", "--budget", "900", "--out", str(out), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["schema_version"] == 1 and report["mode"] == "dry-run"
    assert report["valid"] and report["problems"] == []

    status = {step["name"]: step["status"] for step in report["steps"]}
    assert list(status) == STEPS
    coco_script = (REPO / "tools" / "coco_cost_benchmark.py").is_file()
    expected = {name: "ok" for name in STEPS}
    expected["coco_cost"] = "ok" if coco_script else "skipped (dry run)"
    expected["layer_tests"] = "skipped (dry run)"
    assert status == expected
    # the stand-ins' caps are three times the GPU's (data: 120 s there), so that two cores shared
    # with other work do not time a step out
    data_step = next(step for step in report["steps"] if step["name"] == "data")
    assert data_step["timeout_s"] == 360
    for step in report["steps"]:
        if step["status"] == "ok":
            assert step["exit_code"] == 0 and step["duration_s"] > 0
            assert step["ran"] == "cpu stand-in" and step["commands"], step["name"]

    assert report["versions"]["torch"] == torch.__version__
    results = report["results"]
    # the in-place library of this checkout, and pytest's counts of the (skipped) CUDA tests
    assert results["build"]["library"].startswith(str(REPO / "projects" / "MimicDet"))
    assert results["build"]["seconds"] is None
    assert sum(results["cuda_tests"].values()) > 0
    coco = results["coco_cost"]
    assert set(coco["results"]) == {"mimicdet", "retinanet", "fcos"}
    assert all(row["train_step_ms"] > 0 and row["total_ms"] > 0 for row in coco["results"].values())
    rows = results["deform_conv"]["rows"]
    assert [row["op"] for row in rows] == ["conv2d", "mimicdet", "torchvision"]
    assert all(row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 for row in rows)
    assert rows[2]["fwd_vs_torchvision"] == 1.0
    # the benchmark's smoke sweep of MimicDet on Fashion scenes (composed from the stand-in
    # photos): one run, packed into one file
    (run,) = results["benchmark"]["runs"]
    assert run["run"] == "fashion_scenes/mimicdet/lr0.005-seed0.json" and run["max_iter"] == 3
    assert run["train_s_per_iter"] > 0 and run["infer_ms"] > 0
    # MimicDet's T-head was scored as a detector on the run's final checkpoint, like its S-head
    packed = json.loads((out.parent / "benchmark_runs.json").read_text())["runs"][run["run"]]
    assert set(packed["t_head_final"]) == set(packed["final"]) == {
        "AP", "AP50", "AP75", "APs", "APm", "APl"
    }  # fmt: skip

    assert {"gpu_check.log", "deform_conv_gpu.json", "benchmark_runs.json"} <= set(report["files"])
    combined = (out.parent / "gpu_check.log").read_text()
    assert all(f"=============== {name}: " in combined for name in STEPS)
