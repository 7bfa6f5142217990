from .staggered_fpn import StaggeredFPN, build_mimicdet_resnet_fpn_backbone, build_staggered_fpn

__all__ = ["StaggeredFPN", "build_staggered_fpn", "build_mimicdet_resnet_fpn_backbone"]
