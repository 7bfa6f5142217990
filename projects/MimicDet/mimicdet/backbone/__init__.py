from .mobilenet_v2 import (
    MobileNetV2,
    add_mobilenet_config,
    build_mimicdet_mobilenet_v2_fpn_backbone,
    build_mobilenet_v2_bottom_up,
    build_retinanet_mobilenet_v2_fpn_backbone,
    mobilenet_v2_bottom_up,
)
from .staggered_fpn import (
    StaggeredFPN,
    build_fpn_p3_p7,
    build_mimicdet_resnet_fpn_backbone,
    build_staggered_fpn,
)

__all__ = [
    "MobileNetV2",
    "StaggeredFPN",
    "add_mobilenet_config",
    "build_fpn_p3_p7",
    "build_mimicdet_mobilenet_v2_fpn_backbone",
    "build_mimicdet_resnet_fpn_backbone",
    "build_mobilenet_v2_bottom_up",
    "build_retinanet_mobilenet_v2_fpn_backbone",
    "build_staggered_fpn",
    "mobilenet_v2_bottom_up",
]
