"""Checkpoints that load without unpickling arbitrary objects and never save half-written files."""

import os
import pickle

import torch
from detectron2.checkpoint import DetectionCheckpointer


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
