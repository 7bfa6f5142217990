"""The staggered feature pyramid: P2..P7 in training, P3..P7 (no P2 work at all) at inference."""

import math

import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, build_resnet_backbone
from detectron2.modeling.backbone.fpn import LastLevelP6P7

__all__ = [
    "StaggeredFPN",
    "build_fpn_p3_p7",
    "build_staggered_fpn",
    "build_mimicdet_resnet_fpn_backbone",
]


class StaggeredFPN(FPN):
    """
    detectron2's FPN (same module names, so checkpoints interoperate) whose finest level only
    exists in training: the T-head pools from it, the dense heads never read it. At inference
    the finest lateral and output convs do not run and that level is absent from the outputs.

    With bottom-up features res2..res5 and a P6/P7 top block, training returns
    ``{"p2", ..., "p7"}`` and inference ``{"p3", ..., "p7"}``; each map is ``(N, C, H/s, W/s)``.
    ``output_shape()`` lists every level, as in training.

    When nothing reads the finest level in training either (the T-head disabled, or pooling
    from the S-head's own levels), ``finest_level_in_training=False`` skips it there too and
    freezes its convs: DDP without ``find_unused_parameters`` would otherwise wait forever for
    their gradient. They stay in the module so that checkpoints keep one layout.
    """

    def __init__(self, *args, finest_level_in_training: bool = True, **kwargs):
        """
        Args:
            args, kwargs: as :class:`detectron2.modeling.backbone.FPN`.
            finest_level_in_training: compute the finest level in training (the staggered
                T-head pools from it).
        """
        super().__init__(*args, **kwargs)
        self.finest_level_in_training = finest_level_in_training
        if not finest_level_in_training:
            for name in self.training_only_modules:
                getattr(self, name).requires_grad_(False)

    @property
    def training_only_modules(self):
        """Names of the finest level's lateral and output convs, e.g. ``["fpn_lateral2", ...]``."""
        stage = int(math.log2(self.bottom_up.output_shape()[self.in_features[0]].stride))
        return [f"fpn_lateral{stage}", f"fpn_output{stage}"]

    def forward(self, x):
        """
        Args:
            x (Tensor): images, ``(N, 3, H, W)``.

        Returns:
            dict[str, Tensor]: FPN maps from fine to coarse, ``(N, out_channels, Hi, Wi)``.
        """
        bottom_up_features = self.bottom_up(x)
        # lateral_convs / output_convs are ordered coarse to fine; the last one is the finest
        finest = self.training and self.finest_level_in_training
        num_fpn_levels = len(self.in_features) - (0 if finest else 1)
        prev_features = self.lateral_convs[0](bottom_up_features[self.in_features[-1]])
        results = [self.output_convs[0](prev_features)]
        for idx in range(1, num_fpn_levels):
            lateral = self.lateral_convs[idx](bottom_up_features[self.in_features[-idx - 1]])
            top_down = F.interpolate(prev_features, scale_factor=2.0, mode="nearest")
            prev_features = lateral + top_down
            if self._fuse_type == "avg":
                prev_features = prev_features / 2
            results.insert(0, self.output_convs[idx](prev_features))

        out_features = self._out_features[len(self.in_features) - num_fpn_levels :]
        if self.top_block is not None:
            if self.top_block.in_feature in bottom_up_features:
                top_block_input = bottom_up_features[self.top_block.in_feature]
            else:
                top_block_input = results[out_features.index(self.top_block.in_feature)]
            results.extend(self.top_block(top_block_input))
        return dict(zip(out_features, results))


def build_fpn_p3_p7(cfg, bottom_up, fpn_class=FPN, **kwargs):
    """
    Wrap any bottom-up :class:`Backbone` (ResNet, MobileNetV2, ...) into an FPN of ``fpn_class``
    with RetinaNet's P6/P7 (P6 = 3x3/2 conv on the coarsest bottom-up map, P7 = 3x3/2 on ReLU(P6)).

    Reads ``MODEL.FPN.IN_FEATURES`` (the last one feeds P6), ``OUT_CHANNELS``, ``NORM`` and
    ``FUSE_TYPE``; ``kwargs`` go to ``fpn_class``.
    """
    in_features = cfg.MODEL.FPN.IN_FEATURES
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    top_in = in_features[-1]
    return fpn_class(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(
            bottom_up.output_shape()[top_in].channels, out_channels, in_feature=top_in
        ),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
        **kwargs,
    )


def build_staggered_fpn(cfg, bottom_up):
    """
    :func:`build_fpn_p3_p7` with a :class:`StaggeredFPN`: P2 only in training, and only when the
    staggered T-head reads it (``MODEL.MIMICDET.T_HEAD.ENABLED`` and ``STAGGERED``).
    """
    mcfg = cfg.MODEL.MIMICDET
    return build_fpn_p3_p7(
        cfg,
        bottom_up,
        fpn_class=StaggeredFPN,
        finest_level_in_training=mcfg.T_HEAD.ENABLED and mcfg.STAGGERED,
    )


@BACKBONE_REGISTRY.register()
def build_mimicdet_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet / ResNeXt (detectron2's ``build_resnet_backbone``) under a :class:`StaggeredFPN`."""
    return build_staggered_fpn(cfg, build_resnet_backbone(cfg, input_shape))
