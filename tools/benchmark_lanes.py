#!/usr/bin/env python
"""
Runs the benchmark's remaining parts on a many-sitting CPU: a committed list of stages of
``tools/benchmark.py`` commands, some side by side, with each finished run committed as it lands.

    python tools/benchmark_lanes.py --output /root/bench/output --commit   # go on where it stopped
    python tools/benchmark_lanes.py --dry-run                              # the stages, nothing run

The stages file (``tools/benchmark_stages.txt`` by default) has one stage a line; a stage starts
when the one before it has ended. In a line, ``|`` separates *lanes* that run side by side, each
at ``cores // lanes`` threads, and ``;`` separates the commands a lane runs in turn; a failed
command ends its lane and, once the other lanes are done, the whole run. A command is ``DATASET
ROW [benchmark.py flags]`` (ROW ``all``: every row). Commands are idempotent (``benchmark.py``
never trains a run whose result exists, resumes an interrupted one from its checkpoint in
``--output``, and keeps a ``--retime-training`` pass that already times every chosen row at its
variant), so after a stop the same command line goes on where the last sitting ended: nothing to
edit.

Why lanes: two trainings side by side at one thread each make 1.19x the steps of one alone at
two threads on the 2-core CPU (RetinaNet, 2026-12-04: 0.91 s a step alone, 1.53 s each side by
side; MimicDet, 2026-12-06: 2.89 s, and 4.93 s and 4.83 s). But a run's inference is timed after
its training, and on one thread beside another training its ratio to the yardstick rose from 1.8
to 2.0. So a stage of several lanes serves quiet windows (``quiet_timing``): a command times its
inference with the other lanes paused (SIGSTOP, for the seconds it takes) and at every core, as
alone. The lanes' step times are re-measured side by side at the end (``--retime-training``), as
the tables prefer.

With ``--commit``, each run result is committed alone as it lands, then the tables
(``benchmark.py --report``: ``benchmarks/*.md``, plots, README, MODEL_ZOO) are rebuilt from it
and committed: only those paths, whatever else the index holds. One orchestrator at a time may
use an ``--output`` (a lock file there); stopping it (Ctrl-C, SIGTERM) stops its trainings too,
which resume from their checkpoints next time.
"""

import argparse
import fcntl
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from benchmark_rows import DATASETS, ROWS  # noqa: E402
from quiet_timing import (  # noqa: E402
    QUIET_DIR_ENV,
    QUIET_THREADS_ENV,
    QuietWindows,
    signal_group,
)

DEFAULT_STAGES = REPO / "tools" / "benchmark_stages.txt"
RUNS = "benchmarks/runs"
# what --report writes from the run results: committed after each result that lands
TABLES = ("benchmarks/*.md", "benchmarks/*.png", "benchmarks/results.json", "README.md",
          "MODEL_ZOO.md")  # fmt: skip
# a command's row that means every row (benchmark.py without --rows), e.g. for --retime-training
ALL_ROWS = "all"
# the orchestrator's own flags: a stage line may not override them
RESERVED_FLAGS = ("--dataset", "--rows", "--output", "--results")
# how often a stage of several lanes looks for a quiet-window request (seconds)
QUIET_TICK_S = 0.5


@dataclass(frozen=True)
class Command:
    dataset: str
    row: str
    flags: Tuple[str, ...] = ()

    def argv(self, output):
        rows = [] if self.row == ALL_ROWS else ["--rows", self.row]
        return [
            sys.executable, str(REPO / "tools" / "benchmark.py"), "--output", str(output),
            "--dataset", self.dataset, *rows, *self.flags,
        ]  # fmt: skip

    def __str__(self):
        return " ".join((self.dataset, self.row, *self.flags))


Lane = Tuple[Command, ...]
Stage = Tuple[Lane, ...]


def parse_command(text, where):
    words = text.split()
    if len(words) < 2 or words[0] not in DATASETS or words[1] not in (*ROWS, ALL_ROWS):
        raise ValueError(
            f"{where}: {text.strip()!r} is not 'DATASET ROW [flags]'"
            f" (datasets: {', '.join(DATASETS)}; rows: {', '.join(ROWS)}, or {ALL_ROWS})"
        )
    flags = tuple(words[2:])
    if flags and not flags[0].startswith("-"):
        raise ValueError(f"{where}: {text.strip()!r}: one row a command, then benchmark.py flags")
    reserved = [flag.split("=")[0] for flag in flags if flag.split("=")[0] in RESERVED_FLAGS]
    if reserved:
        raise ValueError(f"{where}: {text.strip()!r}: {reserved[0]} is set by benchmark_lanes.py")
    return Command(words[0], words[1], flags)


def parse_stages(text, source="stages"):
    """The stages of ``text``; a line that is no stage is an error naming its place."""
    stages = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            where = f"{source}:{number}"
            stages.append(
                tuple(
                    tuple(parse_command(command, where) for command in lane.split(";"))
                    for lane in line.split("|")
                )
            )
    return stages


def lane_threads(lanes, cores):
    """Threads per lane: the cores shared out, at least one each."""
    return max(1, cores // max(1, lanes))


def git(repo, *args):
    return subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, check=True
    ).stdout


def changed(repo, pathspecs):
    """Files matching ``pathspecs`` that are new or modified against HEAD (deleted ones are a
    person's business, not a finished run's)."""
    status = git(repo, "status", "--porcelain", "--untracked-files=all", "--", *pathspecs)
    return sorted(line[3:] for line in status.splitlines() if "D" not in line[:2])


def commit_paths(repo, paths, message):
    """Commits exactly ``paths``, leaving anything else a person staged out of it."""
    git(repo, "add", "--", *paths)
    git(repo, "commit", "--quiet", "-m", message, "--", *paths)


def commit_results(repo):
    """Commits the run results that landed since the last call; returns their paths."""
    landed = [path for path in changed(repo, [RUNS]) if path.endswith(".json")]
    if landed:
        message = f"benchmark: {describe(landed)} finished\n\nBy tools/benchmark_lanes.py."
        commit_paths(repo, landed, message)
    return landed


def describe(results):
    """'dataset/row variant-seedK, ...' for run result paths."""
    return ", ".join("/".join(Path(p).parts[-3:-1]) + " " + Path(p).stem for p in results)


def report(repo):
    """benchmark.py --report: the tables, plots, README and MODEL_ZOO from the results."""
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "benchmark.py"), "--report"],
        cwd=repo, capture_output=True, text=True, check=True,
    )  # fmt: skip


def commit_tables(repo, after, rebuild=report):
    """Rebuilds the tables from the results and commits those that changed."""
    rebuild(repo)
    tables = changed(repo, TABLES)
    if tables:
        message = f"benchmark: tables after {after}\n\nBy tools/benchmark_lanes.py."
        commit_paths(repo, tables, message)
    return tables


def log(text):
    print(f"[lanes {time.strftime('%H:%M:%S')}] {text}", flush=True)


def stop(process):
    """Ends a lane's command with the training it started (its own process group)."""
    if process.poll() is None:
        signal_group(process, signal.SIGCONT)  # a paused lane would not act on SIGTERM
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_stage(stage, output, logs, commit=False, poll_s=30):
    """
    Runs a stage's lanes side by side, each lane's commands in turn. A failed command ends its
    lane (what follows it may need its result); the other lanes go on, their runs are worth
    keeping. Returns False if a command failed. With several lanes, a command times its
    inference in a quiet window (``quiet_timing``): the other lanes paused, at every core.
    """
    cores = os.cpu_count() or 1
    threads = lane_threads(len(stage), cores)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.pop(QUIET_DIR_ENV, None)
    quiet = None
    if len(stage) > 1:
        quiet = QuietWindows(Path(output) / ".quiet")
        env.update({QUIET_DIR_ENV: str(quiet.folder), QUIET_THREADS_ENV: str(cores)})
    # a window is asked for and ended within seconds; commits need no such haste
    tick_s = min(poll_s, QUIET_TICK_S) if quiet else poll_s
    ticks_per_poll = max(1, round(poll_s / tick_s))
    queues = [list(lane) for lane in stage]
    running = [None] * len(stage)
    ok = True
    tick = 0
    try:
        while any(queues) or any(running):
            for i, queue in enumerate(queues):
                if running[i] is not None and running[i][0].poll() is not None:
                    process, command = running[i]
                    log(f"lane {i + 1}: {command} ended, exit {process.returncode}")
                    running[i] = None
                    if process.returncode != 0:
                        ok = False
                        queue.clear()
                if running[i] is None and queue:
                    command = queue.pop(0)
                    path = logs / (str(command).replace(" ", "_").replace("/", "-") + ".log")
                    with open(path, "a") as out:
                        process = subprocess.Popen(
                            command.argv(output), cwd=REPO, env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True,
                        )  # fmt: skip
                    log(f"lane {i + 1}: {command} ({threads} threads), log {path}")
                    running[i] = (process, command)
            if quiet is not None:
                quiet.serve([entry[0] for entry in running if entry is not None])
            # each result as it lands (a sweep is one command of several runs), not inside a
            # window: --report would load the machine while a run is timed
            window = quiet is not None and quiet.open
            if commit and not window and (tick % ticks_per_poll == 0 or not any(running)):
                landed = commit_safely(lambda: commit_results(REPO))
                if landed:
                    commit_safely(lambda: commit_tables(REPO, describe(landed)))
            if any(running):
                time.sleep(tick_s)
                tick += 1
    finally:
        if quiet is not None:
            quiet.close()
        for entry in running:
            if entry is not None:
                stop(entry[0])
    return ok


def commit_safely(step):
    """A failed commit (say, a git lock a person holds) is logged and tried again later: the
    results stay in the work tree."""
    try:
        committed = step()
    except subprocess.CalledProcessError as error:
        log(f"commit failed ({error}: {(error.stderr or '').strip()}); trying again later")
        return []
    for path in committed:
        log(f"committed {path}")
    return committed


def lock(output):
    """Holds ``output``'s lock for this process's life: two orchestrators would train the same
    run into the same folder."""
    output.mkdir(parents=True, exist_ok=True)
    handle = open(output / ".benchmark_lanes.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another tools/benchmark_lanes.py is running on {output}") from None
    return handle


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default=str(DEFAULT_STAGES), help="the stages file")
    parser.add_argument("--output", help="benchmark.py --output: training folders")
    parser.add_argument("--logs", default=None, help="one log per command (default: --output)")
    parser.add_argument("--commit", action="store_true", help="commit each run result as it lands")
    parser.add_argument("--dry-run", action="store_true", help="print the stages and stop")
    args = parser.parse_args(argv)
    if not args.dry_run and args.output is None:
        parser.error("--output is required (outside the checkout, so that checkpoints last)")
    return args


def main(argv=None):
    args = parse_args(argv)
    stages_path = Path(args.stages)
    stages = parse_stages(stages_path.read_text(), source=str(stages_path))
    cores = os.cpu_count() or 1
    for number, stage in enumerate(stages, 1):
        lanes = " | ".join("; ".join(str(c) for c in lane) for lane in stage)
        threads = lane_threads(len(stage), cores)
        print(f"stage {number} ({len(stage)} lane(s), {threads} threads each): {lanes}")
    if args.dry_run:
        return 0
    output = Path(args.output).resolve()
    held = lock(output)  # noqa: F841 released when the process ends
    logs = Path(args.logs or output).resolve()
    logs.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C, so that run_stage stops the trainings it started
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    for number, stage in enumerate(stages, 1):
        log(f"stage {number}/{len(stages)}")
        if not run_stage(stage, output, logs, commit=args.commit):
            log(f"stage {number} had a failed command: stopping (see its log in {logs})")
            return 1
    log("every stage ended")
    return 0


if __name__ == "__main__":
    sys.exit(main())
