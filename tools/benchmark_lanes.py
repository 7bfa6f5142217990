#!/usr/bin/env python
"""
Runs the benchmark's remaining parts on a many-sitting CPU: a committed list of stages of
``tools/benchmark.py`` commands, some side by side, with each finished run committed as it lands.

    python tools/benchmark_lanes.py --output /root/bench/output --commit   # go on where it stopped
    python tools/benchmark_lanes.py --dry-run                              # the stages, nothing run

The stages file (``tools/benchmark_stages.txt`` by default) has one stage a line; a stage starts
when the one before it has ended. In a line, ``|`` separates *lanes* that run side by side, each
at ``cores // lanes`` threads, and ``;`` separates the commands a lane runs in turn. A command is
``DATASET ROW [benchmark.py flags]``. Every command is idempotent (``benchmark.py`` never trains
a run whose result exists, and resumes an interrupted one from its checkpoint in ``--output``), so
after a stop the same command line goes on where the last sitting ended: nothing to edit.

Why lanes: two RetinaNet trainings side by side at one thread each took 1.53 s a step each on the
2-core CPU, against 0.91 s for one at two threads (2026-12-04): 1.31 against 1.10 steps a second.
But a run's inference is timed after its training, and on one thread beside another training its
ratio to the yardstick rose from 1.8 to 2.0. The tables take their ms from a row's first reported
seed (seed 1), so the stages train every seed-1 run alone and put only tuning runs (seed 0) and
seeds 2.. into lanes.
"""

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from benchmark_rows import DATASETS, ROWS  # noqa: E402

DEFAULT_STAGES = REPO / "tools" / "benchmark_stages.txt"
# what a commit takes along with the run results: the tables that follow them
COMMITTED = ("benchmarks", "README.md", "MODEL_ZOO.md")


@dataclass(frozen=True)
class Command:
    dataset: str
    row: str
    flags: Tuple[str, ...] = ()

    def argv(self, output):
        return [
            sys.executable, str(REPO / "tools" / "benchmark.py"), "--output", str(output),
            "--dataset", self.dataset, "--rows", self.row, *self.flags,
        ]  # fmt: skip

    def __str__(self):
        return " ".join((self.dataset, self.row, *self.flags))


Lane = Tuple[Command, ...]
Stage = Tuple[Lane, ...]


def parse_stages(text, source="stages"):
    """The stages of ``text``; a line that names no dataset and row is an error naming it."""
    stages = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        lanes = []
        for lane_text in line.split("|"):
            commands = []
            for command_text in lane_text.split(";"):
                words = command_text.split()
                if len(words) < 2 or words[0] not in DATASETS or words[1] not in ROWS:
                    raise ValueError(
                        f"{source}:{number}: {command_text.strip()!r} is not 'DATASET ROW [flags]'"
                        f" (datasets: {', '.join(DATASETS)}; rows: {', '.join(ROWS)})"
                    )
                commands.append(Command(words[0], words[1], tuple(words[2:])))
            lanes.append(tuple(commands))
        stages.append(tuple(lanes))
    return stages


def lane_threads(lanes, cores):
    """Threads per lane: the cores shared out, at least one each."""
    return max(1, cores // max(1, lanes))


def new_results(repo, results):
    """Run results under ``results`` that git does not have yet, or has older versions of."""
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all", "--", str(results / "runs")],
        cwd=repo, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return sorted(line[3:] for line in status.splitlines() if line[3:].endswith(".json"))


def commit_results(repo, results):
    """Commits the run results that landed since the last call, with the tables that follow
    them, in one commit."""
    landed = new_results(repo, results)
    if not landed:
        return []
    present = [path for path in COMMITTED if (Path(repo) / path).exists()]
    subprocess.run(["git", "add", "--", *present], cwd=repo, check=True)
    names = ", ".join(Path(p).parent.name + " " + Path(p).stem for p in landed)
    message = f"benchmark: {names} finished\n\nCommitted by tools/benchmark_lanes.py."
    subprocess.run(["git", "commit", "--quiet", "-m", message], cwd=repo, check=True)
    return landed


def log(text):
    print(f"[lanes {time.strftime('%H:%M:%S')}] {text}", flush=True)


def run_stage(stage, output, logs, commit, results, poll_s=30):
    """Runs a stage's lanes side by side, each lane's commands in turn; returns False if a
    command failed (the other lanes finish first: their runs are worth keeping)."""
    threads = lane_threads(len(stage), os.cpu_count() or 1)
    env = dict(os.environ)
    if len(stage) > 1:
        env["OMP_NUM_THREADS"] = str(threads)
    queues = [list(lane) for lane in stage]
    running = [None] * len(stage)
    ok = True
    while any(queues) or any(running):
        for i, queue in enumerate(queues):
            if running[i] is not None and running[i][0].poll() is not None:
                process, command = running[i]
                log(f"lane {i + 1}: {command} ended, exit {process.returncode}")
                ok = ok and process.returncode == 0
                running[i] = None
            if running[i] is None and queue:
                command = queue.pop(0)
                path = logs / (str(command).replace(" ", "_").replace("/", "-") + ".log")
                with open(path, "a") as out:
                    process = subprocess.Popen(
                        command.argv(output), cwd=REPO, env=env, stdout=out,
                        stderr=subprocess.STDOUT,
                    )  # fmt: skip
                log(f"lane {i + 1}: {command} ({threads} threads), log {path}")
                running[i] = (process, command)
        if commit:
            try:
                for path in commit_results(REPO, results):
                    log(f"committed {path}")
            except subprocess.CalledProcessError as error:  # say, a git lock held by a person
                log(f"commit failed ({error}); trying again at the next poll")
        time.sleep(poll_s if any(running) else 0)
    return ok


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
        threads = lane_threads(len(stage), cores) if len(stage) > 1 else cores
        lanes = " | ".join("; ".join(str(c) for c in lane) for lane in stage)
        print(f"stage {number} ({len(stage)} lane(s), {threads} threads each): {lanes}")
    if args.dry_run:
        return 0
    output = Path(args.output).resolve()
    logs = Path(args.logs or output).resolve()
    logs.mkdir(parents=True, exist_ok=True)
    results = REPO / "benchmarks"
    for number, stage in enumerate(stages, 1):
        log(f"stage {number}/{len(stages)}")
        if not run_stage(stage, output, logs, args.commit, results):
            log(f"stage {number} had a failed command: stopping (see its log in {logs})")
            return 1
    log("every stage ended")
    return 0


if __name__ == "__main__":
    sys.exit(main())
