"""StaggeredFPN: P2..P7 in training, P3..P7 with no P2 work at inference."""

import torch
from detectron2.modeling import build_backbone


def _run_with_hooks(backbone, x):
    called = []
    hooks = [
        getattr(backbone, name).register_forward_hook(
            lambda m, i, o, name=name: called.append(name)
        )
        for name in ["fpn_lateral2", "fpn_output2", "fpn_lateral3", "fpn_output3"]
    ]
    out = backbone(x)
    for h in hooks:
        h.remove()
    return out, called


def test_levels_shapes_and_p2_only_in_training(cfg):
    backbone = build_backbone(cfg)
    x = torch.randn(2, 3, 128, 256)

    backbone.train()
    out, called = _run_with_hooks(backbone, x)
    assert list(out) == ["p2", "p3", "p4", "p5", "p6", "p7"]
    for lvl in range(2, 8):
        assert out[f"p{lvl}"].shape == (2, 32, 128 // 2**lvl, 256 // 2**lvl)
    assert {"fpn_lateral2", "fpn_output2"} <= set(called)

    backbone.eval()
    with torch.no_grad():
        out_eval, called = _run_with_hooks(backbone, x)
    assert list(out_eval) == ["p3", "p4", "p5", "p6", "p7"]
    assert "fpn_lateral2" not in called and "fpn_output2" not in called
    assert {"fpn_lateral3", "fpn_output3"} <= set(called)
    # dropping P2 changes nothing on the coarser levels
    for name, value in out_eval.items():
        torch.testing.assert_close(value, out[name].detach())


def test_p6_p7_from_c5_and_detectron2_names(cfg):
    backbone = build_backbone(cfg)
    assert backbone.top_block.in_feature == "res5"
    assert backbone.top_block.p6.in_channels == backbone.bottom_up.output_shape()["res5"].channels
    names = {n for n, _ in backbone.named_parameters()}
    assert {"fpn_lateral2.weight", "fpn_output2.weight", "top_block.p7.weight"} <= names
    assert backbone.training_only_modules == ["fpn_lateral2", "fpn_output2"]
