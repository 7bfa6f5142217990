"""train_net.main: a few training iterations, then --eval-only, in-process on a tiny dataset."""

import copy
import json
import os
import signal
import sys

import pytest
import torch
from detectron2.engine import default_argument_parser

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
sys.path.insert(0, ROOT)
import train_net  # noqa: E402

YAML = os.path.join(ROOT, "configs", "COCO-Detection", "mimicdet_R_50_FPN_1x.yaml")
LAZY = os.path.join(ROOT, "configs", "COCO-Detection", "mimicdet_R_50_FPN_1x.py")


def _run(argv):
    return train_net.main(default_argument_parser().parse_args(argv))


def _data_opts(name, size=96):
    return [
        "DATASETS.TRAIN", f"('{name}',)",
        "DATASETS.TEST", f"('{name}',)",
        "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.BASE_LR", "0.005",
        "SOLVER.WARMUP_ITERS", "0",
        "INPUT.MIN_SIZE_TRAIN", f"({size},)",
        "INPUT.MAX_SIZE_TRAIN", str(size),
        "INPUT.MIN_SIZE_TEST", str(size),
        "INPUT.MAX_SIZE_TEST", str(size),
        "TEST.EVAL_PERIOD", "0",
    ]  # fmt: skip


def test_yaml_train_then_eval_only(tmp_path, tiny_coco, tiny_opts):
    name = tiny_coco("mimicdet_tiny_yaml")
    out = str(tmp_path / "out")
    opts = tiny_opts + _data_opts(name) + ["OUTPUT_DIR", out]
    _run(
        ["--config-file", YAML, "--num-gpus", "0"]
        + opts
        + ["SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2"]
    )
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    assert os.path.isfile(os.path.join(out, "model_0000001.pth"))
    assert os.path.isfile(os.path.join(out, "metrics.json"))

    final = os.path.join(out, "model_final.pth")
    results = _run(["--config-file", YAML, "--eval-only"] + opts + ["MODEL.WEIGHTS", final])
    assert {"AP", "AP50", "AP75"} <= set(results["bbox"])


def _lazy_opts(name, out):
    return [
        f"dataloader.train.dataset.names={name}",
        f"dataloader.test.dataset.names={name}",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[96]",
        "dataloader.train.mapper.augmentations.0.max_size=96",
        "dataloader.test.mapper.augmentations.0.short_edge_length=96",
        "dataloader.test.mapper.augmentations.0.max_size=96",
        "model.pixel_std=[57.375,57.120,58.395]",
        "optimizer.lr=0.0001",
        "optimizer.momentum=0.9",
        "model.num_classes=2",
        "model.refinement.topk_test=100",
        "train.init_checkpoint=",
        "train.device=cpu",
        "train.max_iter=2",
        "train.eval_period=0",
        f"train.output_dir={out}",
    ]


@pytest.mark.slow
def test_lazyconfig_train_then_eval_only(tmp_path, tiny_coco):
    name = tiny_coco("mimicdet_tiny_lazy")
    out = str(tmp_path / "out")
    opts = _lazy_opts(name, out)
    _run(["--config-file", LAZY] + opts)
    final = os.path.join(out, "model_final.pth")
    assert os.path.isfile(final)
    opts = [o for o in opts if not o.startswith("train.init_checkpoint")]
    results = _run(
        ["--config-file", LAZY, "--eval-only"] + opts + [f"train.init_checkpoint={final}"]
    )
    assert {"AP", "AP50"} <= set(results["bbox"])


@pytest.mark.slow
def test_tiny_model_overfits_synthetic_rectangles(tmp_path, tiny_coco, tiny_opts):
    name = tiny_coco("mimicdet_tiny_overfit", num_images=6)
    out = str(tmp_path / "out")
    opts = tiny_opts + _data_opts(name) + ["OUTPUT_DIR", out]
    train_opts = [
        "SOLVER.IMS_PER_BATCH", "4",
        "SOLVER.BASE_LR", "0.01",
        "SOLVER.WARMUP_ITERS", "20",
        "SOLVER.STEPS", "()",
        "SOLVER.MAX_ITER", "100",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
        "SOLVER.CHECKPOINT_PERIOD", "1000",
        "SEED", "0",
        # a randomly initialised backbone at this learning rate needs clipping to stay stable
        "SOLVER.CLIP_GRADIENTS.ENABLED", "True",
        "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "norm",
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "1.0",
    ]  # fmt: skip
    _run(["--config-file", YAML] + opts + train_opts)
    final = os.path.join(out, "model_final.pth")
    results = _run(["--config-file", YAML, "--eval-only"] + opts + ["MODEL.WEIGHTS", final])
    assert results["bbox"]["AP50"] > 50, results


def test_a_missing_image_stops_training_with_the_file_named(tmp_path, tiny_coco, tiny_opts):
    name = tiny_coco("mimicdet_tiny_missing_image")
    os.remove(tmp_path / name / "images" / "2.png")
    opts = tiny_opts + _data_opts(name) + ["OUTPUT_DIR", str(tmp_path / "out")]
    with pytest.raises(FileNotFoundError, match=r"images/2\.png"):
        _run(["--config-file", YAML, "--num-gpus", "0"] + opts + ["SOLVER.MAX_ITER", "2"])
    assert not os.path.exists(tmp_path / "out" / "model_final.pth")


class _Stop(Exception):
    """A simulated stop of the training process."""


def _stop_in_evaluation(evaluate, evaluated_at, stop):
    """``evaluate``, recording the iteration each call is recorded under in ``evaluated_at`` and
    raising _Stop in the k-th call when ``stop["evaluation"]`` is k."""

    def stoppable(*args, **kwargs):
        from detectron2.utils.events import get_event_storage

        evaluated_at.append(get_event_storage().iter)
        if stop.get("evaluation") == len(evaluated_at):
            raise _Stop
        return evaluate(*args, **kwargs)

    return stoppable


def _evaluated_iterations(out):
    with open(os.path.join(out, "metrics.json")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return sorted(r["iteration"] for r in records if "bbox/AP" in r)


def test_a_resumed_training_evaluates_the_checkpoint_whose_evaluation_a_stop_lost(
    tmp_path, tiny_coco, tiny_opts, monkeypatch
):
    name = tiny_coco("mimicdet_tiny_lost_eval")
    out = str(tmp_path / "out")
    opts = tiny_opts + _data_opts(name) + ["OUTPUT_DIR", out]
    # a checkpoint and an evaluation after iterations 1, 3 and 5; the last evaluation, after
    # training, is recorded one past the last step, under 6
    opts[opts.index("TEST.EVAL_PERIOD") + 1] = "2"
    opts += ["SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "2"]

    evaluated_at, stop = [], {}  # the iteration each evaluation is recorded under
    stoppable_test = _stop_in_evaluation(train_net.Trainer.test.__func__, evaluated_at, stop)
    run_step = train_net.Trainer.run_step
    stepped = []

    def stoppable_run_step(self):
        if stop.get("step") == self.iter:
            raise _Stop
        stepped.append(self.iter)
        run_step(self)

    monkeypatch.setattr(train_net.Trainer, "test", classmethod(stoppable_test))
    monkeypatch.setattr(train_net.Trainer, "run_step", stoppable_run_step)

    def train(resume, **stop_at):
        """train_net.main, stopped where ``stop_at`` says (``evaluation=k``: in this run's k-th
        evaluation, ``step=i``: in step i), recording this run's evaluations and steps."""
        evaluated_at.clear()
        stepped.clear()
        stop.clear()
        stop.update(stop_at)
        argv = ["--config-file", YAML] + (["--resume"] if resume else []) + opts
        if not stop_at:
            return _run(argv)
        with pytest.raises(_Stop):
            _run(argv)

    # stopped in the evaluation after iteration 3, whose checkpoint is written
    train(resume=False, evaluation=2)
    assert os.path.isfile(os.path.join(out, "model_0000003.pth"))
    assert evaluated_at == [1, 3] and _evaluated_iterations(out) == [1]

    # resumed: the lost evaluation comes first, under its iteration; then stopped in step 4
    train(resume=True, step=4)
    assert evaluated_at == [3] and _evaluated_iterations(out) == [1, 3]
    with open(os.path.join(out, "log.txt")) as f:  # the project's logger reaches log.txt
        assert "Evaluating the checkpoint of iteration 3" in f.read()

    # resumed from the same checkpoint, whose evaluation is recorded now: none again; then
    # stopped in the evaluation after training, once model_final.pth is written
    train(resume=True, evaluation=1)
    assert evaluated_at == [6] and _evaluated_iterations(out) == [1, 3]
    assert os.path.isfile(os.path.join(out, "model_final.pth"))

    # resumed from model_final.pth: no step, only the final evaluation, which lands one further
    # on (detectron2 counts the empty training loop as a step); tools/benchmark.py relies on it
    train(resume=True)
    assert stepped == [] and evaluated_at == [7] and _evaluated_iterations(out) == [1, 3, 7]


def test_an_unknown_config_key_fails_with_its_name(tmp_path):
    # yacs names the key: an AssertionError for a command-line key, a KeyError for a yaml one
    opts = ["OUTPUT_DIR", str(tmp_path), "MODEL.MIMICDET.NO_SUCH_KEY", "1"]
    with pytest.raises(AssertionError, match="Non-existent key: MODEL.MIMICDET.NO_SUCH_KEY"):
        _run(["--config-file", YAML] + opts)

    bad_yaml = tmp_path / "typo.yaml"
    bad_yaml.write_text(f'_BASE_: "{YAML}"\nMODEL:\n  MIMICDET:\n    MIMIC:\n      ENABLD: False\n')
    with pytest.raises(KeyError, match="MODEL.MIMICDET.MIMIC.ENABLD"):
        _run(["--config-file", str(bad_yaml), "OUTPUT_DIR", str(tmp_path)])


@pytest.mark.slow
def test_lazyconfig_resume_restores_weights_optimizer_and_iteration(
    tmp_path, tiny_coco, monkeypatch
):
    name = tiny_coco("mimicdet_tiny_lazy_resume")
    out = str(tmp_path / "out")
    opts = _lazy_opts(name, out) + ["train.checkpointer.period=2"]
    _run(["--config-file", LAZY] + opts + ["train.max_iter=4"])
    saved = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=True)
    assert saved["iteration"] == 3

    restored = {}
    resume_or_load = train_net.WeightsOnlyCheckpointer.resume_or_load

    def recording_resume_or_load(self, path, *, resume=True):
        result = resume_or_load(self, path, resume=resume)
        restored["model"] = copy.deepcopy(self.model.state_dict())
        restored["optimizer"] = copy.deepcopy(self.checkpointables["optimizer"].state_dict())
        return result

    monkeypatch.setattr(
        train_net.WeightsOnlyCheckpointer, "resume_or_load", recording_resume_or_load
    )
    # a longer schedule, resumed: iterations 4 and 5 only
    _run(["--config-file", LAZY, "--resume"] + opts + ["train.max_iter=6"])
    for key, value in saved["model"].items():
        assert torch.equal(restored["model"][key], value), key
    momentum = restored["optimizer"]["state"]
    assert momentum, "no momentum buffers restored"
    for index, state in saved["optimizer"]["state"].items():
        assert torch.equal(momentum[index]["momentum_buffer"], state["momentum_buffer"]), index
    with open(os.path.join(out, "log.txt")) as f:
        assert "Starting training from iteration 4" in f.read()
    with open(os.path.join(out, "metrics.json")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    # the last training record is the resumed schedule's last iteration (evaluation, after
    # training, writes a record of its own)
    assert [r["iteration"] for r in records if "total_loss" in r][-1] == 5


@pytest.mark.slow
def test_sigusr1_saves_a_lazyconfig_checkpoint_and_training_goes_on(
    tmp_path, tiny_coco, monkeypatch
):
    """The LazyConfig trainer registers the SIGUSR1 checkpoint hook too (the yaml trainer's is
    tested with a resume in test_resume.py)."""

    class SignalledAtStep1(train_net.CheckpointOnSignal):
        def before_step(self):
            if self.trainer.iter == 1:
                os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(train_net, "CheckpointOnSignal", SignalledAtStep1)
    out = str(tmp_path / "out")
    opts = _lazy_opts(tiny_coco("mimicdet_tiny_lazy_signal"), out)
    _run(["--config-file", LAZY] + opts + ["train.max_iter=3", "train.checkpointer.period=100"])
    saved = torch.load(os.path.join(out, "model_0000001.pth"), weights_only=True)
    assert saved["iteration"] == 1 and "optimizer" in saved
    assert os.path.isfile(os.path.join(out, "model_final.pth"))


@pytest.mark.slow
def test_a_resumed_lazyconfig_training_evaluates_the_checkpoint_whose_evaluation_a_stop_lost(
    tmp_path, tiny_coco, monkeypatch
):
    name = tiny_coco("mimicdet_tiny_lazy_lost_eval")
    out = str(tmp_path / "out")
    # a checkpoint and an evaluation after iteration 1; the evaluation after training is
    # recorded one past the last step, under 4
    opts = _lazy_opts(name, out) + [
        "train.max_iter=4",
        "train.eval_period=2",
        "train.checkpointer.period=2",
    ]
    evaluated_at, stop = [], {}
    # the hooks' lambdas look do_test_lazy up in train_net when they run
    stoppable_test = _stop_in_evaluation(train_net.do_test_lazy, evaluated_at, stop)
    monkeypatch.setattr(train_net, "do_test_lazy", stoppable_test)

    # stopped in the evaluation after iteration 1, whose checkpoint is written
    stop["evaluation"] = 1
    with pytest.raises(_Stop):
        _run(["--config-file", LAZY] + opts)
    assert os.path.isfile(os.path.join(out, "model_0000001.pth"))
    assert evaluated_at == [1] and _evaluated_iterations(out) == []

    # resumed: the lost evaluation first, recorded under its iteration, then the rest
    evaluated_at.clear()
    stop.clear()
    _run(["--config-file", LAZY, "--resume"] + opts)
    assert evaluated_at == [1, 4] and _evaluated_iterations(out) == [1, 4]
