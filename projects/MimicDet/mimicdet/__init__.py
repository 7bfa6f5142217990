"""MimicDet for Detectron2: a one-stage detector trained by mimicking a two-stage head."""

from . import backbone as _  # noqa: F401 registers the backbone builder
from . import distill as _  # noqa: F401,F811 registers the Distiller
from . import modeling as _  # noqa: F401,F811 registers MimicDet and its T-head
from .checkpoint import CheckpointOnSignal, WeightsOnlyCheckpointer, signal_ignored
from .config import add_mimicdet_config, get_mimicdet_cfg
from .data import register_deepforest, register_fashion_scenes
from .distill import add_distill_config

# deepforest_train / deepforest_val; the files are read only when a split is used
register_deepforest()
# fashion_scenes_train / fashion_scenes_val (tools/prepare_fashion_scenes.py)
register_fashion_scenes()

__all__ = [
    "CheckpointOnSignal",
    "WeightsOnlyCheckpointer",
    "add_distill_config",
    "add_mimicdet_config",
    "get_mimicdet_cfg",
    "register_deepforest",
    "register_fashion_scenes",
    "signal_ignored",
]
