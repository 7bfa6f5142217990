"""Datasets used by the MimicDet project."""

from .deepforest import register_deepforest

__all__ = ["register_deepforest"]
