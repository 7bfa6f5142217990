"""Datasets used by the MimicDet project, and checks that catch badly converted data early."""

from .dataset_checks import check_detection_dataset_dicts
from .deepforest import register_deepforest
from .fashion_scenes import register_fashion_scenes
from .mapper import MimicDetDatasetMapper

__all__ = [
    "MimicDetDatasetMapper",
    "check_detection_dataset_dicts",
    "register_deepforest",
    "register_fashion_scenes",
]
