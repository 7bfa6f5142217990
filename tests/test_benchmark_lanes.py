"""tools/benchmark_lanes.py: the committed stages, lanes side by side, and commits as runs land."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import benchmark_lanes  # noqa: E402
from benchmark_lanes import Command, parse_stages  # noqa: E402
from benchmark_rows import ROWS  # noqa: E402


def seeds_of(command):
    """(seed from, seed to) a command trains: --sweep-only is seed 0, --seeds N is 1..N, and
    no flag is the sweep and the row's own seeds."""
    if "--sweep-only" in command.flags:
        return 0, 0
    flags = list(command.flags)
    if "--seeds" not in flags:
        return 0, ROWS[command.row].seeds
    return 1, int(flags[flags.index("--seeds") + 1])


def test_the_committed_stages_train_every_first_reported_seed_alone():
    stages = parse_stages(benchmark_lanes.DEFAULT_STAGES.read_text())
    assert stages, "the committed stages file is empty"
    alone = set()  # (dataset, row) whose seed 1 has trained alone in an earlier stage
    for stage in stages:
        for lane in stage:
            for command in lane:
                first, last = seeds_of(command)
                key = (command.dataset, command.row)
                if len(stage) > 1 and last >= 1:
                    # side by side, its timing is off: seed 1 must be trained already, alone
                    assert key in alone, f"{command} trains seed 1 beside another lane"
        for lane in stage:
            for command in lane:
                if len(stage) == 1 and seeds_of(command)[1] >= 1:
                    alone.add((command.dataset, command.row))


def test_a_stage_line_splits_into_lanes_of_commands_and_bad_lines_name_their_place():
    stages = parse_stages(
        "# a comment\n\n"
        "deepforest fcos --sweep-only | deepforest retinanet --seeds 2 ; deepforest mimicdet\n"
        "fashion_scenes faster_rcnn --seeds 1  # trailing comment\n"
    )
    assert stages == [
        (
            (Command("deepforest", "fcos", ("--sweep-only",)),),
            (
                Command("deepforest", "retinanet", ("--seeds", "2")),
                Command("deepforest", "mimicdet"),
            ),
        ),
        ((Command("fashion_scenes", "faster_rcnn", ("--seeds", "1")),),),
    ]
    with pytest.raises(ValueError, match=r"plan.txt:2: 'deepforest yolo'.*rows: mimicdet"):
        parse_stages("deepforest fcos\ndeepforest yolo | deepforest fcos", source="plan.txt")
    with pytest.raises(ValueError, match=r":1: 'coco fcos'.*datasets: deepforest"):
        parse_stages("coco fcos")


def test_lanes_share_the_cores_out():
    assert benchmark_lanes.lane_threads(2, 2) == 1
    assert benchmark_lanes.lane_threads(2, 16) == 8
    assert benchmark_lanes.lane_threads(3, 2) == 1  # never zero


def fake_benchmark(tmp_path, monkeypatch):
    """Commands that record their thread setting and start/end order, and fail for row 'fcos'."""
    trace = tmp_path / "trace.txt"

    def argv(command, output):
        code = (
            "import os, sys, time\n"
            f"trace = open({str(trace)!r}, 'a')\n"
            "threads = os.environ.get('OMP_NUM_THREADS', '-')\n"
            f"trace.write('start {command.row} ' + threads + '\\n')\n"
            "trace.flush(); time.sleep(0.5)\n"
            f"trace.write('end {command.row}\\n')\n"
            f"sys.exit({int(command.row == 'fcos')})\n"
        )
        return [sys.executable, "-c", code]

    monkeypatch.setattr(Command, "argv", argv)
    monkeypatch.setattr(benchmark_lanes.os, "cpu_count", lambda: 2)
    return trace


def test_a_stage_runs_its_lanes_side_by_side_and_reports_a_failed_command(tmp_path, monkeypatch):
    trace = fake_benchmark(tmp_path, monkeypatch)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    stage = (
        (Command("deepforest", "retinanet"), Command("deepforest", "mimicdet")),
        (Command("deepforest", "faster_rcnn"),),
    )
    assert benchmark_lanes.run_stage(stage, tmp_path, tmp_path, False, tmp_path, poll_s=0.05)
    lines = trace.read_text().splitlines()
    # the second lane started before the first lane's first command ended; one thread each
    assert lines.index("start faster_rcnn 1") < lines.index("end retinanet")
    assert lines.index("end retinanet") < lines.index("start mimicdet 1")
    assert (tmp_path / "deepforest_retinanet.log").is_file()
    # a failed command fails the stage, but the other lane's runs still finish
    trace.unlink()
    stage = ((Command("deepforest", "fcos"),), (Command("deepforest", "retinanet"),))
    assert not benchmark_lanes.run_stage(stage, tmp_path, tmp_path, False, tmp_path, poll_s=0.05)
    assert "end retinanet" in trace.read_text()
    # alone, a command keeps the caller's threads
    trace.unlink()
    stage = ((Command("deepforest", "mimicdet"),),)
    assert benchmark_lanes.run_stage(stage, tmp_path, tmp_path, False, tmp_path, poll_s=0.05)
    assert "start mimicdet -" in trace.read_text()


def git(repo, *args):
    return subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, check=True
    ).stdout


def test_each_run_result_that_lands_is_committed_with_the_tables_once(tmp_path):
    git(tmp_path, "init", "--quiet")
    git(tmp_path, "config", "user.email", "bench@example.com")
    git(tmp_path, "config", "user.name", "bench")
    results = tmp_path / "benchmarks"
    run = results / "runs" / "fashion_scenes" / "fcos" / "lr0.005-seed0.json"
    run.parent.mkdir(parents=True)
    assert benchmark_lanes.commit_results(tmp_path, results) == []
    run.write_text("{}")
    (results / "fashion_scenes.md").write_text("| table |")
    (tmp_path / "README.md").write_text("readme")
    landed = benchmark_lanes.commit_results(tmp_path, results)
    assert landed == ["benchmarks/runs/fashion_scenes/fcos/lr0.005-seed0.json"]
    message = git(tmp_path, "log", "-1", "--format=%s")
    assert re.fullmatch(r"benchmark: fcos lr0.005-seed0 finished\n", message)
    committed = git(tmp_path, "show", "--name-only", "--format=", "HEAD").split()
    assert sorted(committed) == [
        "README.md", "benchmarks/fashion_scenes.md",
        "benchmarks/runs/fashion_scenes/fcos/lr0.005-seed0.json",
    ]  # fmt: skip
    assert git(tmp_path, "status", "--porcelain") == ""
    assert benchmark_lanes.commit_results(tmp_path, results) == []  # nothing new: no commit


def test_the_dry_run_prints_the_stages_and_output_is_required_to_train(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(benchmark_lanes.os, "cpu_count", lambda: 4)
    stages = tmp_path / "stages.txt"
    stages.write_text("deepforest fcos | deepforest retinanet\ndeepforest mimicdet --seeds 1\n")
    assert benchmark_lanes.main(["--dry-run", "--stages", str(stages)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "stage 1 (2 lane(s), 2 threads each): deepforest fcos | deepforest retinanet",
        "stage 2 (1 lane(s), 4 threads each): deepforest mimicdet --seeds 1",
    ]
    with pytest.raises(SystemExit):
        benchmark_lanes.parse_args([])
