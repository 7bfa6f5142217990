"""WeightsOnlyCheckpointer writes: a failed save loses nothing that was there before."""

import multiprocessing
import os
import signal
import time

import pytest
import torch

from mimicdet import WeightsOnlyCheckpointer, signal_ignored


def test_save_writes_the_checkpoint_and_tag_and_leaves_no_temporary_files(tmp_path):
    model = torch.nn.Linear(3, 2)
    checkpointer = WeightsOnlyCheckpointer(model, save_dir=str(tmp_path))
    checkpointer.save("model_0000009", iteration=9)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000009.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert checkpointer.resume_or_load("", resume=True)["iteration"] == 9


def test_a_save_that_dies_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    checkpointer = WeightsOnlyCheckpointer(model, save_dir=str(tmp_path))
    checkpointer.save("model_0000009", iteration=9)
    before = (tmp_path / "model_0000009.pth").read_bytes()

    def dies_after_writing_a_few_bytes(obj, f):
        f.write(b"PK\x03\x04 truncated")
        raise KeyboardInterrupt  # stands for a kill during the save

    monkeypatch.setattr(torch, "save", dies_after_writing_a_few_bytes)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000019", iteration=19)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000009", iteration=19)
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000009.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert (tmp_path / "model_0000009.pth").read_bytes() == before
    assert checkpointer.resume_or_load("", resume=True)["iteration"] == 9


def _sleeper():
    """A process forked as a data-loader worker is: it sets no SIGUSR1 handler of its own."""
    return multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))


def _survives_sigusr1(process):
    process.start()
    try:
        os.kill(process.pid, signal.SIGUSR1)
        process.join(2.0)
        return process.is_alive()
    finally:
        process.terminate()
        process.join()


def test_workers_forked_while_sigusr1_is_ignored_survive_it():
    """train_net.py builds its data loaders inside signal_ignored: a SIGUSR1 sent to the whole
    process group (the training's checkpoint request) must not kill its data-loader workers."""
    previous = signal.getsignal(signal.SIGUSR1)
    with signal_ignored(signal.SIGUSR1):
        worker = _sleeper()
        assert _survives_sigusr1(worker)
    assert signal.getsignal(signal.SIGUSR1) is previous
    if previous is signal.SIG_DFL:  # what the block prevents: the default kills the worker
        worker = _sleeper()
        assert not _survives_sigusr1(worker)
        assert worker.exitcode == -signal.SIGUSR1
