"""The teacher: loaded strictly, frozen, and kept in eval mode whatever the student does."""

import logging

import torch
from torch import nn

from ..checkpoint import WeightsOnlyCheckpointer

__all__ = ["load_teacher_weights", "FrozenTeacher"]

logger = logging.getLogger(__name__)


def load_teacher_weights(model: nn.Module, path: str) -> None:
    """
    Loads ``path`` into ``model`` through the project's weights-only checkpointer and refuses a
    partial load: any tensor of the model missing from the file, any tensor of the file the model
    lacks, or any tensor of another shape raises, naming them (a teacher left half random would
    otherwise be distilled silently).
    """
    if not path:
        raise ValueError(
            "The teacher has no weights (an empty checkpoint path): distilling a random teacher "
            "teaches noise"
        )
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
        raise ValueError(
            f"Teacher checkpoint '{path}' does not match the teacher model: " + " | ".join(problems)
        )
    num_params = sum(p.numel() for p in model.parameters())
    logger.info(f"Teacher loaded from {path}: {num_params / 1e6:.2f} M parameters, all matched")


class FrozenTeacher(nn.Module):
    """
    Wraps a loaded teacher: no parameter requires grad, ``train()`` leaves it in eval mode
    (BatchNorm statistics included), and ``forward`` runs under ``no_grad``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.train(False)  # this wrapper too, not only the model

    def train(self, mode: bool = True):
        # the student's model.train() reaches here through the module tree: stay in eval
        super().train(False)
        return self

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.model(*args, **kwargs)
