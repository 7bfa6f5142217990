"""
MODEL.MIMICDET.T_HEAD.BACKBONE: the paper's "shared versus separated backbone" ablation. The
T-head on a pyramid of its own, trained jointly from the same initialisation or loaded from a
trained MimicDet and frozen; the deploy model is the same in every mode.
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_same_detections
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from mimicdet import WeightsOnlyCheckpointer

TOOL = os.path.join(
    os.path.dirname(__file__), os.pardir, os.pardir, "tools", "convert_to_deploy.py"
)
T_LOSSES = {"loss_t_cls", "loss_t_box"}


def _separate(cfg, mode, frozen_weights=""):
    cfg.MODEL.MIMICDET.T_HEAD.BACKBONE = mode
    cfg.MODEL.MIMICDET.T_HEAD.FROZEN_WEIGHTS = frozen_weights
    return cfg


def _losses(model, inputs):
    model.train()
    with EventStorage():
        return model(inputs)


def test_joint_mode_starts_from_the_same_weights_and_each_pyramid_trains_its_own_head(
    cfg, make_inputs
):
    torch.manual_seed(0)
    model = build_model(_separate(cfg, "separate_joint"))
    shared, own = model.backbone.state_dict(), model.t_backbone.state_dict()
    assert shared.keys() == own.keys() and all(torch.equal(v, own[k]) for k, v in shared.items())

    losses = _losses(model, make_inputs(num_images=2))
    sum(losses.values()).backward()
    # DDP runs without find_unused_parameters: every trainable parameter needs a gradient
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused
    # the shared pyramid computes no P2 now (only the T-head read it), the T-head's own does
    assert not model.backbone.finest_level_in_training
    assert model.t_backbone.finest_level_in_training

    # the T-head's losses train its own pyramid, not the S-head's
    model.zero_grad(set_to_none=True)
    losses = _losses(model, make_inputs(num_images=2))
    sum(v for k, v in losses.items() if k in T_LOSSES).backward()
    assert model.t_backbone.fpn_output3.weight.grad.abs().sum() > 0
    assert model.backbone.fpn_output3.weight.grad is None
    # and the mimic loss (teacher detached) trains the S-head's side only
    model.zero_grad(set_to_none=True)
    losses = _losses(model, make_inputs(num_images=2))
    sum(v for k, v in losses.items() if k.startswith("loss_mimic")).backward()
    assert all(p.grad is None for p in model.t_backbone.parameters())
    assert model.backbone.fpn_output3.weight.grad.abs().sum() > 0


def test_frozen_mode_loads_a_trained_mimicdet_and_never_changes_it(cfg, make_inputs, tmp_path):
    torch.manual_seed(0)
    trained = build_model(cfg)  # a "trained" shared MimicDet: its own random weights
    path = str(tmp_path / "trained.pth")
    torch.save({"model": trained.state_dict()}, path)

    torch.manual_seed(1)
    model = build_model(_separate(cfg.clone(), "separate_frozen", path))
    for prefix, module in (("backbone.", model.t_backbone), ("roi_heads.", model.roi_heads)):
        for key, value in module.state_dict().items():
            assert torch.equal(value, trained.state_dict()[prefix + key]), prefix + key
    losses = _losses(model, make_inputs(num_images=2))
    assert not T_LOSSES & set(losses)  # a fixed teacher has nothing to learn
    assert {"loss_mimic_cls", "loss_mimic_reg"} <= set(losses)
    sum(losses.values()).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.t_backbone.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.roi_heads.parameters())
    assert model.backbone.fpn_output3.weight.grad.abs().sum() > 0


def test_frozen_mode_without_a_usable_checkpoint_is_a_clear_error(cfg, tmp_path):
    with pytest.raises(ValueError, match="needs T_HEAD.FROZEN_WEIGHTS"):
        build_model(_separate(cfg.clone(), "separate_frozen"))
    torch.manual_seed(0)
    state = {k: v for k, v in build_model(cfg).state_dict().items() if not k.startswith("roi_")}
    path = str(tmp_path / "deploy.pth")
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match=r"deploy.pth: its roi_heads\.\* tensors"):
        build_model(_separate(cfg.clone(), "separate_frozen", path))
    with pytest.raises(ValueError, match="T_HEAD.BACKBONE is 'separated'"):
        build_model(_separate(cfg.clone(), "separated"))


def test_the_deploy_model_is_the_shared_configs(cfg, make_inputs, tmp_path):
    """A separate-backbone checkpoint converts to a deploy checkpoint with the paper config's
    keys, which the shared config loads and predicts with exactly as the trained model did."""
    torch.manual_seed(0)
    model = build_model(_separate(cfg.clone(), "separate_joint")).eval()
    WeightsOnlyCheckpointer(model, save_dir=str(tmp_path)).save("separate")
    deploy = str(tmp_path / "deploy.pth")
    subprocess.run([sys.executable, TOOL, str(tmp_path / "separate.pth"), deploy], check=True)

    torch.manual_seed(3)
    shared = build_model(cfg).eval()
    state = torch.load(deploy, weights_only=True)["model"]
    kept = {k for k in shared.state_dict() if not k.startswith("roi_heads.")}
    kept -= {k for k in kept if k.startswith(("backbone.fpn_lateral2.", "backbone.fpn_output2."))}
    assert set(state) == kept
    WeightsOnlyCheckpointer(shared).load(deploy)

    inputs = [{"image": x["image"]} for x in make_inputs(num_images=2)]
    with torch.no_grad():
        expected, got = model(inputs), shared(inputs)
    assert_same_detections(expected, got)


def _imagenet_pkl(model, path):
    """The shared backbone's bottom-up weights as a name-matched ``.pkl``, as detectron2's
    tools/convert-torchvision-to-d2.py writes ImageNet weights: keys without the model's
    prefixes, numpy arrays, ``matching_heuristics``."""
    import pickle

    prefix = "backbone.bottom_up."
    weights = {
        k[len(prefix) :]: v.numpy() + 1.0  # not the model's own values
        for k, v in model.state_dict().items()
        if k.startswith(prefix) and v.is_floating_point()
    }
    with open(path, "wb") as f:
        pickle.dump({"model": weights, "__author__": "torchvision", "matching_heuristics": True}, f)
    return weights


def test_pretrained_weights_initialise_both_pyramids_in_joint_mode(cfg, tmp_path):
    """A name-matched ImageNet .pkl (MODEL.WEIGHTS of the COCO configs) loads into the shared
    pyramid, not twice; the T-head's own pyramid then starts as its copy."""
    torch.manual_seed(0)
    model = build_model(_separate(cfg, "separate_joint"))
    weights = _imagenet_pkl(model, str(tmp_path / "imagenet.pkl"))
    WeightsOnlyCheckpointer(model).load(str(tmp_path / "imagenet.pkl"))
    for key, value in weights.items():
        assert torch.equal(model.backbone.bottom_up.state_dict()[key], torch.from_numpy(value))
    shared, own = model.backbone.state_dict(), model.t_backbone.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in shared.items())

    # a checkpoint of a joint run (resume) loads each pyramid from its own tensors
    with torch.no_grad():
        model.t_backbone.fpn_output3.weight.add_(1.0)
    WeightsOnlyCheckpointer(model, save_dir=str(tmp_path)).save("joint")
    torch.manual_seed(1)
    resumed = build_model(cfg)
    WeightsOnlyCheckpointer(resumed).load(str(tmp_path / "joint.pth"))
    assert torch.equal(resumed.t_backbone.fpn_output3.weight, model.t_backbone.fpn_output3.weight)
    assert not torch.equal(
        resumed.t_backbone.fpn_output3.weight, resumed.backbone.fpn_output3.weight
    )


def test_pretrained_weights_leave_a_frozen_t_head_as_it_was_loaded(cfg, tmp_path):
    torch.manual_seed(0)
    trained = build_model(cfg.clone())
    path = str(tmp_path / "trained.pth")
    torch.save({"model": trained.state_dict()}, path)
    model = build_model(_separate(cfg, "separate_frozen", path))
    _imagenet_pkl(model, str(tmp_path / "imagenet.pkl"))
    WeightsOnlyCheckpointer(model).load(str(tmp_path / "imagenet.pkl"))
    for key, value in model.t_backbone.state_dict().items():
        assert torch.equal(value, trained.state_dict()["backbone." + key]), key
