"""WeightsOnlyCheckpointer writes: a failed save loses nothing that was there before."""

import os

import pytest
import torch

from mimicdet import WeightsOnlyCheckpointer


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
