"""The teacher: loaded strictly, frozen, and kept in eval mode whatever the student does."""

import logging

import torch
from torch import nn

from ..checkpoint import load_weights_strictly

__all__ = ["load_teacher_weights", "FrozenTeacher"]

logger = logging.getLogger(__name__)


def load_teacher_weights(model: nn.Module, path: str) -> None:
    """
    Loads ``path`` into ``model`` with :func:`mimicdet.checkpoint.load_weights_strictly`: a
    missing, extra or reshaped tensor raises, naming it (a teacher left half random would
    otherwise be distilled silently). An empty path is refused too.
    """
    if not path:
        raise ValueError(
            "The teacher has no weights (an empty checkpoint path): distilling a random teacher "
            "teaches noise"
        )
    load_weights_strictly(model, path, "teacher model")
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
