"""
Quiet windows: a benchmark command that trains beside others (a lane of
``tools/benchmark_lanes.py``) times its inference with the other lanes paused, at the threads
it would have alone, so that its timing is the one a run trained alone would record.

Why: two trainings side by side at one thread each make 1.19x the steps of one alone at two
threads (MimicDet on Fashion scenes, 2026-12-06: 2.89 s a step alone, 4.93 s and 4.83 s side by
side), but beside another training a run's inference slowed against the yardstick timed with it
(the ratio went from 1.81 to 2.0, RetinaNet, 2026-12-04). A window of a few seconds a run keeps
the first and removes the second.

The protocol, in the folder named by ``$BENCHMARK_QUIET_DIR`` (set by the orchestrator for a
stage of several lanes; without it there is nothing to ask for):

1. the timing process writes ``<pid>-<token>.request`` (a new token each window) and waits for
   ``<pid>-<token>.granted``;
2. the orchestrator stops every other lane's process group (SIGSTOP), notes their group ids in
   ``paused``, then writes the ``.granted`` file; one window at a time, oldest request first;
3. the timing process sets torch's threads to ``$BENCHMARK_QUIET_THREADS``, times, restores its
   threads and deletes its two files;
4. the orchestrator continues the other lanes (SIGCONT) and empties ``paused``; it does so too
   when the timing process ends without deleting its request. An orchestrator killed inside a
   window (SIGKILL) leaves ``paused``: the next one, starting, ends those lanes (SIGCONT, then
   SIGTERM), whose runs it trains again from their checkpoints.
"""

import contextlib
import os
import signal
import time
from pathlib import Path

QUIET_DIR_ENV = "BENCHMARK_QUIET_DIR"
QUIET_THREADS_ENV = "BENCHMARK_QUIET_THREADS"


@contextlib.contextmanager
def quiet_window(wait_s=1800.0, poll_s=0.2):
    """
    Runs the block with the other lanes paused and torch at ``$BENCHMARK_QUIET_THREADS`` threads
    when ``$BENCHMARK_QUIET_DIR`` is set; yields whether it did. Waiting longer than ``wait_s``
    for the window (another lane's window, an evaluation's worth, comes first) is an error: the
    orchestrator that should grant it has gone.
    """
    folder = os.environ.get(QUIET_DIR_ENV)
    if not folder:
        yield False
        return
    import torch

    request = Path(folder) / f"{os.getpid()}-{time.monotonic_ns()}.request"
    granted = request.with_suffix(".granted")
    request.touch()
    try:
        deadline = time.monotonic() + wait_s
        while not granted.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"no quiet window for timing after {wait_s:.0f} s: is the"
                    f" tools/benchmark_lanes.py that set {QUIET_DIR_ENV}={folder} still running?"
                )
            time.sleep(poll_s)
        threads = torch.get_num_threads()
        torch.set_num_threads(int(os.environ.get(QUIET_THREADS_ENV, threads)))
        try:
            yield True
        finally:
            torch.set_num_threads(threads)
    finally:
        granted.unlink(missing_ok=True)
        request.unlink(missing_ok=True)  # the window ends with it


def signal_group(process, signum):
    """Sends ``signum`` to ``process``'s process group (a lane: benchmark.py, its training and
    the training's data-loader workers); a group that has ended is left alone."""
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def _pid(request):
    """The process id of a ``<pid>-<token>.request`` file, None for another name."""
    pid = request.stem.split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


class QuietWindows:
    """
    The orchestrator's side: call :meth:`serve` with the lanes' running processes (``Popen``
    objects, each the leader of its process group) every fraction of a second, and
    :meth:`close` when the stage ends or is interrupted.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._paused_file = self.folder / "paused"
        self._end_lanes_left_paused()
        for stale in [*self.folder.glob("*.request"), *self.folder.glob("*.granted")]:
            stale.unlink(missing_ok=True)  # an earlier orchestrator's, its processes gone
        self.holder = None  # (process, request) timing now
        self.paused = []

    def _end_lanes_left_paused(self):
        """Lanes an orchestrator killed inside a window left stopped: frozen, they would hold
        their runs' folders forever; continued, they would train beside this orchestrator's."""
        if not self._paused_file.exists():
            return
        for group in self._paused_file.read_text().split():
            for signum in (signal.SIGCONT, signal.SIGTERM):
                try:
                    os.killpg(int(group), signum)
                except (ProcessLookupError, PermissionError):
                    break
        self._paused_file.unlink()

    @property
    def open(self):
        """Whether a command is timing now (nothing else should load the machine)."""
        return self.holder is not None

    def serve(self, processes):
        """Ends the window whose process finished timing (or ended), then opens the next one."""
        if self.holder is not None:
            process, request = self.holder
            if request.exists() and process.poll() is None:
                return
            self._end_window()
        live = {p.pid: p for p in processes if p is not None and p.poll() is None}
        requests = []
        for request in self.folder.glob("*.request"):
            try:
                requests.append((request.stat().st_mtime, request))
            except FileNotFoundError:  # withdrawn meanwhile
                pass
        for _, request in sorted(requests):
            holder = live.get(_pid(request))
            if holder is None:  # not a running lane's: nothing will ever delete it
                request.unlink(missing_ok=True)
                continue
            self.paused = [p for p in live.values() if p is not holder]
            self._paused_file.write_text(" ".join(str(p.pid) for p in self.paused))
            for process in self.paused:
                signal_group(process, signal.SIGSTOP)
            self.holder = (holder, request)
            request.with_suffix(".granted").touch()
            return

    def _end_window(self):
        _, request = self.holder
        request.with_suffix(".granted").unlink(missing_ok=True)
        for process in self.paused:
            signal_group(process, signal.SIGCONT)
        self._paused_file.unlink(missing_ok=True)
        self.holder, self.paused = None, []

    def close(self):
        """Continues every lane this object paused."""
        if self.holder is not None:
            self._end_window()
