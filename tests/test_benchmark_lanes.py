"""tools/benchmark_lanes.py: the committed stages, lanes side by side, and commits as runs land."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import benchmark_lanes  # noqa: E402
from benchmark_lanes import Command, parse_stages  # noqa: E402
from benchmark_rows import DATASETS, ROWS, root_row  # noqa: E402
from quiet_timing import QuietWindows  # noqa: E402

TRAINS_NOTHING = ("--retime-training", "--retime", "--report", "--plan")


def seeds_of(command):
    """The (first, last) seed a command trains, None if it trains nothing: --sweep-only is seed
    0, --seeds N is 1..N, and no such flag the sweep and the row's own seeds."""
    flags = list(command.flags)
    if any(flag in flags for flag in TRAINS_NOTHING):
        return None
    if "--sweep-only" in flags:
        return 0, 0
    if "--seeds" not in flags:
        return 0, ROWS[command.row].seeds
    return 1, int(flags[flags.index("--seeds") + 1])


def committed_seeds(dataset, row):
    """The seeds of ``row`` whose results are committed on ``dataset``'s current schedule."""
    seeds = set()
    for path in (REPO / "benchmarks" / "runs" / dataset / row).glob("*-seed*.json"):
        if json.loads(path.read_text())["max_iter"] == DATASETS[dataset].max_iter:
            seeds.add(int(path.stem.rsplit("-seed", 1)[1]))
    return seeds


def test_the_committed_stages_train_what_a_command_needs_before_it():
    """Lanes run side by side, so a command may only rely on what an earlier stage, or an
    earlier command of its own lane, trained: a reported seed on its detector's sweep (else two
    lanes would train the same sweep run into one folder), a student on its teacher's sweep. A
    student's teacher seed needs no command of its own: benchmark.py trains a seed that is
    neither committed nor here first, and the next test keeps two lanes from both doing so."""
    stages = parse_stages(benchmark_lanes.DEFAULT_STAGES.read_text())
    assert stages, "the committed stages file is empty"
    places = [
        (command, (s, lane, position))
        for s, stage in enumerate(stages)
        for lane, commands in enumerate(stage)
        for position, command in enumerate(commands)
    ]

    def before(a, b):
        return a[0] < b[0] or (a[0] == b[0] and a[1] == b[1] and a[2] < b[2])

    for command, place in places:
        seeds = seeds_of(command)
        if not seeds or seeds[1] < 1 or command.row == benchmark_lanes.ALL_ROWS:
            continue
        row = ROWS[command.row]
        needs = {(root_row(command.row), 0)}  # its detector's sweep: the chosen variant
        if row.teacher:
            needs |= {(root_row(row.teacher), 0)}
        for needed_row, seed in sorted(needs):
            trained_by = [
                other_place
                for other, other_place in places
                if other.dataset == command.dataset
                and other.row in (needed_row, benchmark_lanes.ALL_ROWS)
                and seeds_of(other)
                and seeds_of(other)[0] <= seed <= seeds_of(other)[1]
            ]
            # trained in the file: by a command before this one (a later one finds it done);
            # else committed already
            if trained_by:
                assert any(before(p, place) for p in trained_by), (
                    f"{command} at {place}: needs {needed_row} seed {seed}, trained at"
                    f" {trained_by} (stage, lane, position), none before it"
                )
            else:  # seed 0: some of the sweep at least (it chose a variant)
                assert seed in committed_seeds(command.dataset, needed_row), (
                    f"{command}: needs {needed_row} seed {seed}, neither trained nor committed"
                )


def test_no_two_lanes_of_a_committed_stage_may_train_the_same_run():
    """Side by side, two lanes training one run would write one folder at once. A command may
    train its own runs not trained before (committed, or by an earlier stage), and a student
    its teacher's seeds whatever was trained: a teacher whose checkpoint is gone trains again."""
    stages = parse_stages(benchmark_lanes.DEFAULT_STAGES.read_text())
    done = {
        (dataset, row, seed)
        for dataset in DATASETS
        for row in ROWS
        for seed in committed_seeds(dataset, row)
        if seed >= 1  # a committed seed-0 run may be one of a sweep that is not complete
    }

    def may_train(command):
        seeds = seeds_of(command)
        if not seeds or command.row == benchmark_lanes.ALL_ROWS:
            return set(), set()
        own = {(command.dataset, command.row, seed) for seed in range(seeds[0], seeds[1] + 1)}
        teacher = ROWS[command.row].teacher
        teachers = {
            (command.dataset, teacher, seed) for seed in range(max(1, seeds[0]), seeds[1] + 1)
        } if teacher else set()  # fmt: skip
        return own - done, teachers

    for number, stage in enumerate(stages, 1):
        trained_here = []
        for lane in stage:
            runs = set()
            for command in lane:
                own, teachers = may_train(command)
                runs |= own | teachers
            trained_here.append(runs)
        for i in range(len(stage)):
            for j in range(i + 1, len(stage)):
                both = trained_here[i] & trained_here[j]
                assert not both, f"stage {number}: lanes {i + 1} and {j + 1} may both train {both}"
        for lane in stage:
            for command in lane:
                done |= may_train(command)[0]


def test_a_stage_line_splits_into_lanes_of_commands_and_bad_lines_name_their_place():
    stages = parse_stages(
        "# a comment\n\n"
        "deepforest fcos --sweep-only | deepforest retinanet --seeds 2 ; deepforest mimicdet\n"
        "fashion_scenes all --retime-training  # trailing comment\n"
    )
    assert stages == [
        (
            (Command("deepforest", "fcos", ("--sweep-only",)),),
            (
                Command("deepforest", "retinanet", ("--seeds", "2")),
                Command("deepforest", "mimicdet"),
            ),
        ),
        ((Command("fashion_scenes", "all", ("--retime-training",)),),),
    ]
    # "all" runs benchmark.py without --rows; a row is passed as the only --rows
    assert "--rows" not in stages[1][0][0].argv("out")
    assert stages[0][1][0].argv("out")[-4:] == ["--rows", "retinanet", "--seeds", "2"]
    with pytest.raises(ValueError, match=r"plan.txt:2: 'deepforest yolo'.*rows: mimicdet"):
        parse_stages("deepforest fcos\ndeepforest yolo | deepforest fcos", source="plan.txt")
    with pytest.raises(ValueError, match=r":1: 'coco fcos'.*datasets: deepforest"):
        parse_stages("coco fcos")
    with pytest.raises(ValueError, match=r":1: 'deepforest fcos retinanet': one row a command"):
        parse_stages("deepforest fcos retinanet")
    with pytest.raises(ValueError, match=r"--output is set by benchmark_lanes.py"):
        parse_stages("deepforest fcos --seeds 1 --output=/tmp/elsewhere")


def test_lanes_share_the_cores_out():
    assert benchmark_lanes.lane_threads(2, 2) == 1
    assert benchmark_lanes.lane_threads(2, 16) == 8
    assert benchmark_lanes.lane_threads(1, 2) == 2
    assert benchmark_lanes.lane_threads(3, 2) == 1  # never zero


@pytest.fixture
def fake_benchmark(tmp_path, monkeypatch):
    """Commands that write their thread setting and their start and end to a trace; row 'fcos'
    fails at once, the others take 0.5 s."""
    trace = tmp_path / "trace.txt"

    def argv(command, output):
        code = (
            "import os, sys, time\n"
            f"trace = open({str(trace)!r}, 'a')\n"
            "threads = os.environ.get('OMP_NUM_THREADS', '-')\n"
            f"trace.write('start {command.row} ' + threads + '\\n')\n"
            f"trace.flush(); sys.exit(1) if {command.row == 'fcos'} else time.sleep(0.5)\n"
            f"trace.write('end {command.row}\\n')\n"
        )
        return [sys.executable, "-c", code]

    monkeypatch.setattr(Command, "argv", argv)
    monkeypatch.setattr(benchmark_lanes.os, "cpu_count", lambda: 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the caller's: a stage sets its own
    return trace


def run_stage(stage, tmp_path):
    return benchmark_lanes.run_stage(stage, tmp_path, tmp_path, commit=False, poll_s=0.05)


def test_a_stage_runs_its_lanes_side_by_side_one_thread_each(tmp_path, fake_benchmark):
    stage = (
        (Command("deepforest", "retinanet"), Command("deepforest", "mimicdet")),
        (Command("deepforest", "faster_rcnn"),),
    )
    assert run_stage(stage, tmp_path)
    lines = fake_benchmark.read_text().splitlines()
    # the second lane started before the first lane's first command ended; one thread each
    assert lines.index("start faster_rcnn 1") < lines.index("end retinanet")
    assert lines.index("end retinanet") < lines.index("start mimicdet 1")
    assert (tmp_path / "deepforest_retinanet.log").is_file()
    # alone, a command gets every core, whatever the caller's environment said
    fake_benchmark.unlink()
    assert run_stage(((Command("deepforest", "mimicdet"),),), tmp_path)
    assert "start mimicdet 2" in fake_benchmark.read_text()


def test_a_failed_command_ends_its_lane_while_the_other_lanes_finish(tmp_path, fake_benchmark):
    stage = (
        (Command("deepforest", "fcos"), Command("deepforest", "mimicdet")),
        (Command("deepforest", "retinanet"), Command("deepforest", "faster_rcnn")),
    )
    assert not run_stage(stage, tmp_path)
    trace = fake_benchmark.read_text()
    assert "start mimicdet" not in trace  # it may need the failed command's result
    assert "end retinanet" in trace and "end faster_rcnn" in trace


def test_stopping_the_orchestrator_stops_the_trainings_it_started(tmp_path, monkeypatch):
    marker = tmp_path / "still_running"

    def argv(command, output):  # a training that would write its marker after 3 s
        code = f"import time, pathlib; time.sleep(3); pathlib.Path({str(marker)!r}).touch()"
        return [sys.executable, "-c", code]

    monkeypatch.setattr(Command, "argv", argv)
    ticks = iter(range(3))

    def sleep(seconds):  # the orchestrator is interrupted at its second poll
        if next(ticks) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(benchmark_lanes, "time", SimpleNamespace(sleep=sleep, strftime=str))
    stage = ((Command("deepforest", "retinanet"),), (Command("deepforest", "fcos"),))
    with pytest.raises(KeyboardInterrupt):
        benchmark_lanes.run_stage(stage, tmp_path, tmp_path, poll_s=0.05)
    time.sleep(3.5)
    assert not marker.exists()


def test_one_orchestrator_at_a_time_per_output(tmp_path):
    held = benchmark_lanes.lock(tmp_path / "out")
    with pytest.raises(SystemExit, match="another tools/benchmark_lanes.py is running on"):
        benchmark_lanes.lock(tmp_path / "out")
    held.close()
    benchmark_lanes.lock(tmp_path / "out").close()  # free again once the holder is gone


def git(repo, *args):
    return benchmark_lanes.git(repo, *args)


def init_repo(repo):
    """A git repository with a person's work staged, and the folder of Fashion FCOS results."""
    git(repo, "init", "--quiet")
    git(repo, "config", "user.email", "bench@example.com")
    git(repo, "config", "user.name", "bench")
    (repo / "notes.txt").write_text("a person's work")
    git(repo, "add", "notes.txt")
    runs = repo / "benchmarks" / "runs" / "fashion_scenes" / "fcos"
    runs.mkdir(parents=True)
    return runs


def test_a_run_result_is_committed_alone_as_it_lands_and_never_what_a_person_staged(tmp_path):
    run = init_repo(tmp_path) / "lr0.005-seed0.json"
    assert benchmark_lanes.commit_results(tmp_path) == []
    run.write_text("{}")
    (run.parent / "lr0.01-seed0.json.tmp").write_text("{")  # a result still being written
    landed = benchmark_lanes.commit_results(tmp_path)
    assert landed == ["benchmarks/runs/fashion_scenes/fcos/lr0.005-seed0.json"]
    assert git(tmp_path, "log", "-1", "--format=%s") == (
        "benchmark: fashion_scenes/fcos lr0.005-seed0 finished\n"
    )
    assert git(tmp_path, "show", "--name-only", "--format=", "HEAD").split() == landed
    assert git(tmp_path, "diff", "--cached", "--name-only").split() == ["notes.txt"]
    assert benchmark_lanes.commit_results(tmp_path) == []  # nothing new: no commit
    run.unlink()  # a deleted result is a person's business, not a finished run
    assert benchmark_lanes.commit_results(tmp_path) == []


def test_the_tables_rebuilt_after_a_result_are_committed_without_the_results_or_staged_work(
    tmp_path,
):
    runs = init_repo(tmp_path)
    (runs / "lr0.01-seed0.json").write_text("{}")  # landed after the last poll: not a table

    def rebuild(repo):
        (repo / "README.md").write_text("the headline table")
        (repo / "benchmarks" / "fashion_scenes.md").write_text("| fcos |")
        (repo / "benchmarks" / "fashion_scenes_ap_curves.png").write_bytes(b"png")

    tables = benchmark_lanes.commit_tables(tmp_path, "fashion_scenes fcos --seeds 1", rebuild)
    assert tables == [
        "README.md", "benchmarks/fashion_scenes.md", "benchmarks/fashion_scenes_ap_curves.png",
    ]  # fmt: skip
    assert git(tmp_path, "show", "--name-only", "--format=%s", "HEAD").split() == [
        "benchmark:", "tables", "after", "fashion_scenes", "fcos", "--seeds", "1", *tables,
    ]  # fmt: skip
    assert git(tmp_path, "diff", "--cached", "--name-only").split() == ["notes.txt"]
    # unchanged tables: no commit
    assert benchmark_lanes.commit_tables(tmp_path, "again", rebuild) == []


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


def _counting_lane(path, stop_file=None, limit=3000):
    """A lane that counts into ``path`` every 20 ms (atomically), so a test sees whether it is
    paused; it ends 1 s after ``stop_file`` exists, or after ``limit`` counts."""
    code = (
        "import os, time, pathlib\n"
        f"path, stop = pathlib.Path({str(path)!r}), {str(stop_file)!r}\n"
        "ends = None\n"
        f"for i in range({limit}):\n"
        "    path.with_suffix('.tmp').write_text(str(i))\n"
        "    os.replace(path.with_suffix('.tmp'), path)\n"
        "    if ends is None and stop != 'None' and os.path.exists(stop):\n"
        "        ends = time.time() + 1.0\n"
        "    if ends is not None and time.time() > ends:\n"
        "        break\n"
        "    time.sleep(0.02)\n"
    )
    return [sys.executable, "-c", code]


def _count(path):
    deadline = time.time() + 60
    while not path.exists():
        assert time.time() < deadline, f"{path.name}: the lane never counted"
        time.sleep(0.02)
    return int(path.read_text())


def _advancing(path, wait_s=5.0):
    """Whether the lane counts on (within ``wait_s``: the machine may be loaded)."""
    before, deadline = _count(path), time.time() + wait_s
    while time.time() < deadline:
        if _count(path) > before:
            return True
        time.sleep(0.02)
    return False


def _paused(path):
    """Whether the lane stands still (once a stop signal had time to land)."""
    time.sleep(0.1)
    before = _count(path)
    time.sleep(0.4)
    return _count(path) == before


def test_a_quiet_window_pauses_the_other_lanes_until_its_timing_ends(tmp_path):
    windows = QuietWindows(tmp_path / "quiet")
    lanes = [
        subprocess.Popen(_counting_lane(tmp_path / name), start_new_session=True)
        for name in ("a", "b")
    ]
    a, b = lanes
    request = windows.folder / f"{a.pid}-1.request"
    try:
        _count(tmp_path / "a"), _count(tmp_path / "b")  # both counting
        stale = windows.folder / "1-1.request"  # no lane's: an ended process's, say
        stale.touch()
        request.touch()
        windows.serve(lanes)
        assert request.with_suffix(".granted").exists() and not stale.exists()
        assert _paused(tmp_path / "b") and _advancing(tmp_path / "a")
        windows.serve(lanes)  # still timing: b stays paused
        assert _paused(tmp_path / "b")
        request.unlink()  # timing done
        windows.serve(lanes)
        assert not request.with_suffix(".granted").exists()
        assert _advancing(tmp_path / "b")
        # a lane that ends inside its window leaves no other lane paused
        (windows.folder / f"{b.pid}-2.request").touch()
        windows.serve(lanes)
        assert _paused(tmp_path / "a")
        b.kill()
        b.wait()
        windows.serve(lanes)
        assert _advancing(tmp_path / "a")
    finally:
        windows.close()
        for lane in lanes:
            lane.kill()
            lane.wait()


def test_lanes_an_orchestrator_left_paused_are_ended_by_the_next_one(tmp_path):
    """Killed inside a window (SIGKILL: no clean-up), an orchestrator leaves a lane stopped; the
    next one ends it rather than let it hold its run's folder, frozen or training beside it."""
    windows = QuietWindows(tmp_path / "quiet")
    timing, other = [
        subprocess.Popen(_counting_lane(tmp_path / name), start_new_session=True)
        for name in ("timing", "other")
    ]
    try:
        _count(tmp_path / "timing"), _count(tmp_path / "other")
        (windows.folder / f"{timing.pid}-1.request").touch()
        windows.serve([timing, other])
        assert _paused(tmp_path / "other")
        QuietWindows(tmp_path / "quiet")  # the next orchestrator, the first never closed
        assert other.wait(timeout=30) == -signal.SIGTERM
        assert timing.poll() is None  # the lane that was timing was never paused
    finally:
        for lane in (timing, other):
            lane.kill()
            lane.wait()


def test_a_command_in_a_lane_times_with_the_others_paused_and_at_every_core(
    tmp_path, monkeypatch
):
    counter, trace = tmp_path / "counter", tmp_path / "trace.txt"
    timing = (  # what benchmark.py does around its inference timing
        "import sys, time, pathlib\n"
        f"sys.path.insert(0, {str(REPO / 'tools')!r})\n"
        "import torch\n"
        "from quiet_timing import quiet_window\n"
        f"counter = pathlib.Path({str(counter)!r})\n"
        "while not counter.exists():\n"
        "    time.sleep(0.02)\n"
        "with quiet_window(wait_s=120) as quiet:\n"
        "    before = counter.read_text()\n"
        "    time.sleep(0.5)\n"
        "    paused = counter.read_text() == before\n"
        "    threads = torch.get_num_threads()\n"
        "result = f'{quiet} {paused} {threads} {torch.get_num_threads()} {counter.read_text()}'\n"
        f"pathlib.Path({str(trace)!r}).write_text(result)\n"
    )

    def argv(command, output):
        if command.row == "retinanet":  # a training beside it
            return _counting_lane(counter, stop_file=trace)
        return [sys.executable, "-c", timing]

    monkeypatch.setattr(Command, "argv", argv)
    monkeypatch.setattr(benchmark_lanes.os, "cpu_count", lambda: 2)
    stage = ((Command("deepforest", "retinanet"),), (Command("deepforest", "mimicdet"),))
    assert benchmark_lanes.run_stage(stage, tmp_path, tmp_path, poll_s=0.05)
    quiet, paused, inside, after, count = trace.read_text().split()
    # in the window: the other lane paused, torch at both cores; after it, one thread again
    assert (quiet, paused, inside, after) == ("True", "True", "2", "1")
    assert int(counter.read_text()) > int(count)  # the other lane went on afterwards
    assert not list((tmp_path / ".quiet").iterdir())
    # a lane alone has nothing to ask for: it times as it is
    trace.unlink()
    counter.write_text("0")
    alone = ((Command("deepforest", "mimicdet"),),)
    assert benchmark_lanes.run_stage(alone, tmp_path, tmp_path, poll_s=0.05)
    assert trace.read_text().split()[:4] == ["False", "True", "2", "2"]
