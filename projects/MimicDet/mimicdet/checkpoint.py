"""Checkpoint loading that never unpickles arbitrary objects."""
import pickle

import torch
from detectron2.checkpoint import DetectionCheckpointer


class WeightsOnlyCheckpointer(DetectionCheckpointer):
    """
    A `DetectionCheckpointer` whose `.pth` loading always uses `torch.load(weights_only=True)`,
    whatever torch's default is, so a checkpoint can only hold tensors, numbers, strings and
    containers of them. A checkpoint that holds anything else is refused with an error naming
    the file; there is no fallback to unsafe loading. detectron2's `.pkl` model-zoo files keep
    detectron2's own loader.
    """

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
