"""tools/convert_to_deploy.py: smaller checkpoint, identical inference, one quiet log line."""

import logging
import os
import subprocess
import sys

import torch
from conftest import assert_same_detections
from detectron2.modeling import build_model

from mimicdet import WeightsOnlyCheckpointer

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
TOOL = os.path.join(ROOT, "tools", "convert_to_deploy.py")


def _predict(cfg, weights, inputs):
    model = build_model(cfg).eval()
    WeightsOnlyCheckpointer(model).load(weights)
    with torch.no_grad():
        return model(inputs)


def test_deploy_checkpoint_is_smaller_and_predicts_identically(cfg, make_inputs, tmp_path, caplog):
    torch.manual_seed(0)
    model = build_model(cfg)
    WeightsOnlyCheckpointer(model, save_dir=str(tmp_path)).save("full")
    full, deploy = str(tmp_path / "full.pth"), str(tmp_path / "deploy.pth")

    proc = subprocess.run(
        [sys.executable, TOOL, full, deploy], capture_output=True, text=True, check=True
    )
    assert "file size" in proc.stdout and "parameters" in proc.stdout

    keys = torch.load(deploy, weights_only=True)["model"].keys()
    assert not any(k.startswith("roi_heads.") for k in keys)
    assert not any(k.startswith(("backbone.fpn_lateral2.", "backbone.fpn_output2.")) for k in keys)
    assert "backbone.fpn_lateral3.weight" in keys and "s_head.cls_score.weight" in keys
    assert os.path.getsize(deploy) < os.path.getsize(full)

    inputs = make_inputs(num_images=2, size=96)
    expected = _predict(cfg, full, inputs)
    with caplog.at_level(logging.INFO):
        got = _predict(cfg, deploy, inputs)
    assert_same_detections(expected, got)

    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("roi_heads" in w or "fpn_lateral2" in w for w in warnings), warnings
    explained = [r.getMessage() for r in caplog.records if "training-only" in r.getMessage()]
    assert len(explained) == 1


def test_converting_a_deploy_checkpoint_again_changes_nothing(cfg, make_inputs, tmp_path):
    torch.manual_seed(0)
    model = build_model(cfg)
    WeightsOnlyCheckpointer(model, save_dir=str(tmp_path)).save("full")
    full, once, twice = (str(tmp_path / f"{n}.pth") for n in ("full", "once", "twice"))
    for src, dst in ((full, once), (once, twice)):
        subprocess.run([sys.executable, TOOL, src, dst], capture_output=True, check=True)
    first = torch.load(once, weights_only=True)["model"]
    second = torch.load(twice, weights_only=True)["model"]
    # P3's lateral and output convs are now the finest FPN stage, and inference runs them
    assert "backbone.fpn_lateral3.weight" in second and "backbone.fpn_output3.weight" in second
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)

    inputs = make_inputs(num_images=1, size=96)
    a = _predict(cfg, once, inputs)[0]["instances"]
    b = _predict(cfg, twice, inputs)[0]["instances"]
    assert len(a) > 0 and torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)


def test_a_deploy_checkpoint_missing_an_inference_weight_is_reported(cfg, tmp_path, caplog):
    """Only the training-only modules' absence is explained away; any other gap is a warning."""
    torch.manual_seed(0)
    WeightsOnlyCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("full")
    deploy = str(tmp_path / "deploy.pth")
    subprocess.run([sys.executable, TOOL, str(tmp_path / "full.pth"), deploy], check=True)
    checkpoint = torch.load(deploy, weights_only=True)
    del checkpoint["model"]["backbone.fpn_lateral3.weight"]
    del checkpoint["model"]["backbone.bottom_up.res2.0.conv1.weight"]
    torch.save(checkpoint, deploy)
    with caplog.at_level(logging.INFO):
        WeightsOnlyCheckpointer(build_model(cfg).eval()).load(deploy)
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "backbone.fpn_lateral3.weight" in warnings
    assert "backbone.bottom_up.res2.0.conv1.weight" in warnings
    assert "fpn_lateral2" not in warnings and "roi_heads" not in warnings
