"""Float32BoxFCOS: the project's FCOS configs train and infer under autocast, and in float32
compute exactly what detectron2's FCOS does. CPU autocast (bfloat16) takes the path that CUDA's
float16 takes with ``--amp``."""

import copy
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling.meta_arch.fcos import FCOS
from detectron2.utils.events import EventStorage

from mimicdet.modeling import Float32BoxFCOS

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
FCOS_CONFIGS = [
    "DeepForest/fcos_MNV2_FPN.py",
    "FashionScenes/fcos_MNV2_FPN.py",
    "DeepForest/distill/fcos_MNV2_FPN_student.py",
]


def build_fcos(config="FashionScenes/fcos_MNV2_FPN.py"):
    """The config's model with random weights (no ImageNet file), in train mode."""
    cfg = LazyConfig.load(os.path.join(CONFIGS, config))
    cfg.model.backbone.bottom_up.imagenet_weights = ""
    torch.manual_seed(0)
    return instantiate(cfg.model).train()


@pytest.mark.parametrize("config", FCOS_CONFIGS)
def test_every_fcos_config_builds_the_float32_box_fcos(config):
    assert type(build_fcos(config)) is Float32BoxFCOS


def test_in_float32_it_trains_as_detectron2s_fcos_does(make_inputs):
    ours = build_fcos()
    theirs = FCOS.__new__(FCOS)
    theirs.__dict__.update(copy.deepcopy(ours.__dict__))
    inputs = make_inputs(num_images=2, size=128)  # 128 px: P3..P7
    with EventStorage():
        ours_losses, their_losses = ours(inputs), theirs(inputs)
    assert set(ours_losses) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}
    for name, value in ours_losses.items():
        assert torch.equal(value, their_losses[name]), name


def float32_bottom_up(model):
    """Runs the MobileNetV2 outside autocast: its depthwise convs take minutes in bfloat16 on a
    CPU, and what is tested here starts at the FPN."""
    forward = model.backbone.bottom_up.forward

    def forward_without_autocast(x):
        with torch.autocast("cpu", enabled=False):
            return forward(x.float())

    model.backbone.bottom_up.forward = forward_without_autocast
    return model


def test_trains_and_infers_under_autocast_with_float32_boxes(make_inputs):
    model = float32_bottom_up(build_fcos())
    with EventStorage(), torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(make_inputs(num_images=2, size=128))
    assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
    sum(losses.values()).backward()
    grad = model.head.bbox_pred.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0

    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        boxes = model(make_inputs(num_images=1, size=128))[0]["instances"].pred_boxes.tensor
    assert len(boxes) > 0 and boxes.dtype == torch.float32
