"""Layers of MimicDet, including the compiled deformable convolution."""

from .guided_deform_conv import GuidedDeformConv, deform_conv2d, deform_conv2d_at

__all__ = ["GuidedDeformConv", "deform_conv2d", "deform_conv2d_at"]
