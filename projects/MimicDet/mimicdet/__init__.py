"""MimicDet for Detectron2: a one-stage detector trained by mimicking a two-stage head."""
from .checkpoint import WeightsOnlyCheckpointer

__all__ = ["WeightsOnlyCheckpointer"]
