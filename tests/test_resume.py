"""
Crash and resume: train_net.py killed with SIGKILL at a random moment after a checkpoint exists,
then restarted with --resume, continues from the last complete checkpoint and finishes.
"""

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from detectron2.engine import HookBase, default_argument_parser

from conftest import _write_coco

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, ROOT)
import train_net  # noqa: E402

YAML = os.path.join(ROOT, "configs", "COCO-Detection", "mimicdet_R_50_FPN_1x.yaml")
MAX_ITER, PERIOD = 8, 2

# train_net.py's own entry point, after registering the tiny dataset in the training process
WRAPPER = """
import sys
sys.path.insert(0, {root!r})
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import default_argument_parser, launch
import train_net
register_coco_instances({name!r}, {{}}, {json_file!r}, {image_dir!r})
args = default_argument_parser().parse_args()
launch(train_net.main, args.num_gpus, args=(args,))
"""


def _opts(name, out, tiny_opts):
    return tiny_opts + [
        "DATASETS.TRAIN", f"('{name}',)",
        "DATASETS.TEST", "()",
        "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.BASE_LR", "0.005",
        "SOLVER.WARMUP_ITERS", "4",
        # a step inside the run, so a wrongly restored scheduler shows in the learning rate
        "SOLVER.STEPS", f"({MAX_ITER // 2},)",
        "SOLVER.MAX_ITER", str(MAX_ITER),
        "SOLVER.CHECKPOINT_PERIOD", str(PERIOD),
        "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.MAX_SIZE_TRAIN", "64",
        "TEST.EVAL_PERIOD", "0",
        "OUTPUT_DIR", out,
    ]  # fmt: skip


def _assert_checkpoints_complete(out):
    """Every .pth loads weights-only, and last_checkpoint names an existing one."""
    # The tag is read before listing: a checkpoint is renamed into place before the tag names it,
    # so a tag read first must name a file the listing sees, even while training goes on.
    tag = os.path.join(out, "last_checkpoint")
    last = None
    if os.path.exists(tag):
        with open(tag) as f:
            last = f.read().strip()
    names = [f for f in os.listdir(out) if f.endswith(".pth")]
    for f in names:
        torch.load(os.path.join(out, f), map_location="cpu", weights_only=True)
    assert last is None or last in names, (last, names)
    return last


def _assert_same(actual, expected, where):
    if isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for k in expected:
            _assert_same(actual[k], expected[k], f"{where}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_same(a, e, f"{where}[{i}]")
    elif torch.is_tensor(expected):
        assert torch.equal(actual.cpu(), expected), where
    else:
        assert actual == expected, where


@pytest.mark.slow
def test_sigkill_then_resume_continues_from_the_last_complete_checkpoint(
    tmp_path, tiny_opts, monkeypatch
):
    name = "mimicdet_tiny_resume"
    json_file, image_dir = _write_coco(str(tmp_path / name), size=64)
    script = tmp_path / "train.py"
    script.write_text(
        WRAPPER.format(root=ROOT, name=name, json_file=json_file, image_dir=image_dir)
    )
    out = str(tmp_path / "out")
    opts = _opts(name, out, tiny_opts)

    proc = subprocess.Popen(
        [sys.executable, str(script), "--config-file", YAML] + opts,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while not (os.path.isdir(out) and _assert_checkpoints_complete(out)):
            assert proc.poll() is None, "training ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
        # a random moment later: mid-iteration or mid-save, whatever the clock hits
        kill_at = time.time() + random.uniform(0.0, 1.0)
        while time.time() < kill_at:
            _assert_checkpoints_complete(out)
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before the kill"
    assert not os.path.exists(os.path.join(out, "model_final.pth"))
    last = _assert_checkpoints_complete(out)
    assert last is not None
    expected = torch.load(os.path.join(out, last), map_location="cpu", weights_only=True)

    # resume in this process, recording the trainer right after it loaded the checkpoint
    restored = {}
    resume_or_load = train_net.Trainer.resume_or_load

    def recording_resume_or_load(self, resume=True):
        resume_or_load(self, resume=resume)
        # copies: training goes on updating these tensors in place
        restored.update(
            model=copy.deepcopy(self.model.state_dict()),
            optimizer=copy.deepcopy(self.optimizer.state_dict()),
            scheduler=copy.deepcopy(self.scheduler.state_dict()),
            start_iter=self.start_iter,
        )

    monkeypatch.setattr(train_net.Trainer, "resume_or_load", recording_resume_or_load)
    from detectron2.data.datasets import register_coco_instances

    register_coco_instances(name, {}, json_file, image_dir)
    try:
        train_net.main(
            default_argument_parser().parse_args(["--config-file", YAML, "--resume"] + opts)
        )
    finally:
        from detectron2.data import DatasetCatalog, MetadataCatalog

        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)

    assert restored["start_iter"] == expected["iteration"] + 1
    _assert_same(restored["model"], expected["model"], "model")
    _assert_same(restored["optimizer"], expected["trainer"]["_trainer"]["optimizer"], "optimizer")
    assert restored["optimizer"]["state"], "no momentum buffers restored"
    scheduler = expected["trainer"]["hooks"]["LRScheduler"]
    _assert_same(restored["scheduler"], scheduler, "scheduler")
    with open(os.path.join(out, "log.txt")) as f:
        assert f"Starting training from iteration {expected['iteration'] + 1}" in f.read()

    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    assert _assert_checkpoints_complete(out) == "model_final.pth"
    with open(os.path.join(out, "metrics.json")) as f:
        iterations = [json.loads(line)["iteration"] for line in f if line.strip()]
    assert iterations[-1] == MAX_ITER - 1


class _SignalAt(HookBase):
    """Sends this process ``signum`` before step ``iteration``, as a batch system would."""

    def __init__(self, iteration, signum):
        self.iteration, self.signum = iteration, signum

    def before_step(self):
        if self.trainer.iter == self.iteration:
            os.kill(os.getpid(), self.signum)


def test_sigusr1_saves_a_checkpoint_that_resume_continues_from(tmp_path, tiny_opts, monkeypatch):
    """SIGUSR1 during step 1 saves that step's checkpoint and training goes on; a stop after it
    resumes at step 2 with the checkpoint's state, not from the last periodic checkpoint. During
    the last step it saves nothing more: model_final stays the last checkpoint."""
    name = "mimicdet_tiny_sigusr1"
    json_file, image_dir = _write_coco(str(tmp_path / name), size=64)
    out = str(tmp_path / "out")
    # no periodic checkpoint before the end: only the signal can save step 1
    opts = _opts(name, out, tiny_opts) + ["SOLVER.CHECKPOINT_PERIOD", "100"]
    build_hooks = train_net.Trainer.build_hooks
    monkeypatch.setattr(
        train_net.Trainer,
        "build_hooks",
        # step 1, and the last step, which saves model_final anyway
        lambda self: build_hooks(self)
        + [_SignalAt(1, signal.SIGUSR1), _SignalAt(MAX_ITER - 1, signal.SIGUSR1)],
    )
    previous = signal.getsignal(signal.SIGUSR1)
    from detectron2.data.datasets import register_coco_instances

    register_coco_instances(name, {}, json_file, image_dir)
    try:
        train_net.main(default_argument_parser().parse_args(["--config-file", YAML] + opts))
        assert signal.getsignal(signal.SIGUSR1) is previous  # the handler is put back
        saved = torch.load(os.path.join(out, "model_0000001.pth"), weights_only=True)
        assert saved["iteration"] == 1 and saved["trainer"]["iteration"] == 1
        assert "LRScheduler" in saved["trainer"]["hooks"]
        assert sorted(f for f in os.listdir(out) if f.endswith(".pth")) == [
            "model_0000001.pth", "model_final.pth",
        ]  # fmt: skip
        assert _assert_checkpoints_complete(out) == "model_final.pth"

        # the machine stopped after the signal's checkpoint: resume from it
        os.remove(os.path.join(out, "model_final.pth"))
        with open(os.path.join(out, "last_checkpoint"), "w") as f:
            f.write("model_0000001.pth")
        monkeypatch.setattr(train_net.Trainer, "build_hooks", build_hooks)
        restored = {}
        resume_or_load = train_net.Trainer.resume_or_load

        def recording_resume_or_load(self, resume=True):
            resume_or_load(self, resume=resume)
            restored.update(model=copy.deepcopy(self.model.state_dict()), start=self.start_iter)

        monkeypatch.setattr(train_net.Trainer, "resume_or_load", recording_resume_or_load)
        train_net.main(
            default_argument_parser().parse_args(["--config-file", YAML, "--resume"] + opts)
        )
    finally:
        from detectron2.data import DatasetCatalog, MetadataCatalog

        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert restored["start"] == 2
    _assert_same(restored["model"], saved["model"], "model")
    with open(os.path.join(out, "log.txt")) as f:
        log = f.read()
    assert f"kill -USR1 {os.getpid()} saves a checkpoint" in log
    assert "SIGUSR1: saving the checkpoint of iteration 1" in log
    assert "Starting training from iteration 2" in log
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
