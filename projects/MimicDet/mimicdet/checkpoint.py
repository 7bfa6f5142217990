"""Checkpoints that load without unpickling arbitrary objects and never save half-written files."""

import contextlib
import logging
import os
import pickle
import signal
import threading

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import HookBase
from detectron2.utils import comm

logger = logging.getLogger(__name__)


def atomic_write(path, write):
    """
    Calls `write(file)` on a temporary file beside `path`, then renames it onto `path`: a crash or
    kill at any moment leaves either the old file or the complete new one, never a truncated one.
    """
    # Beside the target (same file system, so the rename is atomic); plain open keeps the umask.
    tmp_path = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp_path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise


class WeightsOnlyCheckpointer(DetectionCheckpointer):
    """
    A `DetectionCheckpointer` that is safe on both ends:

    * `.pth` files always load with `torch.load(weights_only=True)`, whatever torch's default is,
      so a checkpoint can only hold tensors, numbers, strings and containers of them. Anything else
      is refused with an error naming the file; there is no fallback to unsafe loading.
      detectron2's `.pkl` model-zoo files keep detectron2's own loader.
    * checkpoints and the `last_checkpoint` tag are written atomically (temporary file, then
      rename), so a kill during a save never leaves a truncated checkpoint or a tag pointing at one.
    """

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        tag_file = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(tag_file, lambda f: f.write(last_filename_basename.encode()))

    def _load_file(self, filename):
        if filename.endswith(".pkl"):
            return super()._load_file(filename)
        try:
            loaded = torch.load(filename, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise RuntimeError(
                f"Refusing to load checkpoint '{filename}': it holds Python objects other than "
                "tensors, numbers, strings and containers, and loading them would run arbitrary "
                "code (torch.load weights_only=True). Re-save it with only state dicts, e.g. "
                "torch.save({'model': model.state_dict()}, path), from a trusted environment.\n"
                f"torch said: {e}"
            ) from e
        if "model" not in loaded:
            loaded = {"model": loaded}
        return loaded

    def _load_model(self, checkpoint):
        """
        detectron2's loading, plus two rules a model may declare for its submodules (MimicDet's
        separated T-head pyramid):

        * ``checkpoint_skips``: names of submodules no checkpoint loads, because their weights
          come from elsewhere (a frozen T-head from ``T_HEAD.FROZEN_WEIGHTS``);
        * ``checkpoint_copies``: ``{name: source}``, a submodule that the checkpoint has no
          tensor for starts as a copy of ``source`` once that is loaded (the same
          initialisation, e.g. from ImageNet weights).

        Both are hidden from the load itself, so that detectron2's name-matching heuristics
        (``.pkl`` files) do not match one ImageNet tensor to two pyramids.
        """
        model, state = self.model, checkpoint["model"]
        heuristic = checkpoint.get("matching_heuristics", False)
        copies = {
            name: source
            for name, source in getattr(model, "checkpoint_copies", {}).items()
            if heuristic or not any(k.startswith(name + ".") for k in state)
        }
        hidden = {name: getattr(model, name) for name in getattr(model, "checkpoint_skips", ())}
        hidden.update({name: getattr(model, name) for name in copies})
        if not hidden:
            return super()._load_model(checkpoint)
        prefixes = tuple(f"{name}." for name in hidden)
        checkpoint["model"] = {k: v for k, v in state.items() if not k.startswith(prefixes)}
        for name in hidden:
            setattr(model, name, None)  # out of state_dict() while the checkpoint loads
        try:
            incompatible = super()._load_model(checkpoint)
        finally:
            for name, module in hidden.items():
                setattr(model, name, module)
        for name, source in copies.items():
            getattr(model, name).load_state_dict(getattr(model, source).state_dict())
            self.logger.info(
                f"{name} starts as a copy of the loaded {source} (same initialisation)"
            )
        skipped = sorted(set(hidden) - set(copies))
        if skipped:
            self.logger.info(f"{skipped} keep their own weights: checkpoints do not load them")
        return incompatible


def load_weights_strictly(model, path, what="model"):
    """
    Loads ``path`` into ``model`` through :class:`WeightsOnlyCheckpointer` and refuses a partial
    load: any tensor of the model missing from the file, any tensor of the file the model lacks,
    or any tensor of another shape raises a ValueError naming them, the file and ``what`` the
    model is (a model left half random would otherwise run silently).
    """
    checkpointer = WeightsOnlyCheckpointer(model)
    checkpoint = checkpointer._load_file(checkpointer.path_manager.get_local_path(path))
    incompatible = checkpointer._load_model(checkpoint)
    problems = []
    if incompatible.missing_keys:
        problems.append(f"missing from the file: {', '.join(incompatible.missing_keys[:10])}")
    if incompatible.unexpected_keys:
        problems.append(f"not in the model: {', '.join(incompatible.unexpected_keys[:10])}")
    if incompatible.incorrect_shapes:
        shapes = [
            f"{k} {tuple(f)} in the file vs {tuple(m)}" for k, f, m in incompatible.incorrect_shapes
        ]
        problems.append(f"other shapes: {'; '.join(shapes[:10])}")
    if problems:
        raise ValueError(f"Checkpoint '{path}' does not match the {what}: " + " | ".join(problems))


@contextlib.contextmanager
def signal_ignored(signum=signal.SIGUSR1):
    """
    Ignores ``signum`` while the block runs, in this process and in the processes it starts
    meanwhile that set no handler of their own (an ignored signal stays ignored across fork and
    exec): data-loader workers and ``launch``'s worker processes, which a signal sent to a whole
    process group (``pkill -f``, a batch system) would otherwise kill, and the training with
    them. Inside, :class:`CheckpointOnSignal` handles the signal in the training process itself.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread
        return
    previous = signal.signal(signum, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signum, previous)


class CheckpointOnSignal(HookBase):
    """
    Saves a checkpoint when the training process receives ``signum`` (SIGUSR1 by default), at
    the end of the step it arrives in, then trains on. A batch system that warns before it stops
    a job (SLURM's ``--signal=USR1@120``), or a person about to stop a machine, so loses no
    steps: ``--resume`` goes on from that checkpoint, not from the last periodic one.

    The checkpoint is the one ``PeriodicCheckpointer`` writes (``model_<iter>.pth`` with the
    iteration, tagged in ``last_checkpoint``), so register this hook after the LR scheduler's.
    A step that ``PeriodicCheckpointer`` saves anyway (every ``period``-th, and the last, as
    ``model_final``) is not saved twice: a second file would re-tag ``last_checkpoint`` away from
    ``model_final.pth``. Every process installs the handler (a process without one would die of
    the signal); only the main one writes, as the checkpointer does. The signal's previous
    handler comes back after training.

    Data-loader workers: forked (Linux's start method before Python 3.14) after training starts,
    as detectron2 starts them, they inherit the handler, which only sets a flag of theirs; forked
    inside :func:`signal_ignored` before that, they ignore the signal. Workers of the ``spawn``
    or ``forkserver`` start methods started after training starts would die of it: there,
    signal the training process alone (``kill``, not ``pkill`` or a process group).
    """

    def __init__(self, checkpointer, period=0, signum=signal.SIGUSR1, file_prefix="model"):
        """``period``: the periodic checkpointer's (0: none)."""
        self._checkpointer = checkpointer
        self._period = period
        self._signum = signum
        self._file_prefix = file_prefix
        self._requested = False
        self._previous = None

    def _request(self, signum, frame):
        # only a flag here: a signal may arrive in the middle of a step or of a save
        self._requested = True

    def before_train(self):
        if threading.current_thread() is not threading.main_thread():
            logger.warning(
                f"Training outside the main thread: {signal.Signals(self._signum).name} will"
                " not save a checkpoint (Python handles signals in the main thread only)."
            )
            return
        self._previous = signal.signal(self._signum, self._request)
        if comm.is_main_process():
            logger.info(
                f"kill -{signal.Signals(self._signum).name[3:]} {os.getpid()} saves a checkpoint"
                " at the end of the current step, to --resume from"
            )

    def after_step(self):
        if not self._requested:
            return
        self._requested = False
        iteration, name = self.trainer.iter, signal.Signals(self._signum).name
        periodic = self._period > 0 and (iteration + 1) % self._period == 0
        if periodic or iteration >= self.trainer.max_iter - 1:
            logger.info(f"{name}: iteration {iteration}'s own checkpoint serves")
            return
        logger.info(f"{name}: saving the checkpoint of iteration {iteration}")
        self._checkpointer.save(f"{self._file_prefix}_{iteration:07d}", iteration=iteration)

    def after_train(self):
        if self._previous is not None:
            signal.signal(self._signum, self._previous)
            self._previous = None
