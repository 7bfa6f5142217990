"""tools/export_model.py: the deploy model traced to TorchScript gives the eager model's boxes."""

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from conftest import TINY_OPTS, tiny_cfg

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import export_model  # noqa: E402
from convert_to_deploy import convert  # noqa: E402

YAML = os.path.join(ROOT, "configs", "COCO-Detection", "mimicdet_R_50_FPN_1x.yaml")
# every detection kept, so a randomly initialised model has plenty of boxes to compare
TEST_OPTS = [
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "96",
    "MODEL.MIMICDET.S_HEAD.SCORE_THRESH_TEST", "0.0",
]  # fmt: skip

# a fresh interpreter: only the op library, not the model's Python code, is needed
RUN_TORCHSCRIPT = """
import sys, torch
import mimicdet.layers  # registers torch.ops.mimicdet.deform_conv2d
model = torch.jit.load(sys.argv[1])
images = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    torch.save([model(image) for image in images], sys.argv[3])
"""


@pytest.fixture(scope="module")
def deploy_checkpoint(tmp_path_factory):
    from detectron2.modeling import build_model

    tmp = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    torch.save({"model": model.state_dict()}, tmp / "model.pth")
    convert(str(tmp / "model.pth"), str(tmp / "model_deploy.pth"))
    return str(tmp / "model_deploy.pth")


def _image(seed, height, width):
    return np.random.RandomState(seed).randint(0, 256, (height, width, 3)).astype(np.uint8)


def _eager(cfg, images):
    model = export_model.build_deploy_model(cfg)
    outputs = []
    with torch.no_grad():
        for image in images:
            inst = model([{"image": image}])[0]["instances"]
            outputs.append((inst.pred_boxes.tensor, inst.pred_classes, inst.scores))
    return outputs


def _traced_fields(output):
    """TracingAdapter's flat outputs: Instances fields by name, then the image size."""
    boxes, classes, scores, image_size = output
    return boxes, classes, scores


@pytest.mark.slow
def test_torchscript_export_matches_eager_in_a_fresh_process(tmp_path, deploy_checkpoint):
    opts = list(TINY_OPTS) + TEST_OPTS + ["MODEL.WEIGHTS", deploy_checkpoint]
    cfg = export_model.setup_cfg(YAML, opts)
    sample = tmp_path / "sample.png"
    cv2.imwrite(str(sample), _image(0, 48, 64))
    out = tmp_path / "ts"
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "export_model.py"), "--config-file", YAML]
        + ["--format", "torchscript", "--output", str(out), "--sample-image", str(sample)]
        + opts,
        check=True,
    )
    assert (out / "model.ts").is_file()

    # the sample image and another image of the same size after resizing (64 x 85)
    images = [export_model.preprocess(cfg, _image(s, 48, 64)) for s in (0, 1)]
    assert images[0].shape == images[1].shape == (3, 64, 85)
    torch.save(images, tmp_path / "images.pth")
    script = tmp_path / "run_ts.py"
    script.write_text(RUN_TORCHSCRIPT)
    subprocess.run(
        [sys.executable, str(script), str(out / "model.ts")]
        + [str(tmp_path / "images.pth"), str(tmp_path / "outputs.pth")],
        check=True,
    )
    traced = torch.load(tmp_path / "outputs.pth", weights_only=True)

    for (boxes, classes, scores), output in zip(_eager(cfg, images), traced):
        assert len(boxes) > 10
        t_boxes, t_classes, t_scores = _traced_fields(output)
        assert t_boxes.shape == boxes.shape
        torch.testing.assert_close(t_boxes, boxes, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(t_scores, scores, rtol=1e-5, atol=1e-6)
        assert torch.equal(t_classes, classes)


def test_traced_model_is_tied_to_the_traced_input_size(tmp_path, deploy_checkpoint):
    """
    A trace gives the eager model's detections for any image of the traced size, and not for
    another size: the documented limit (anchors and the feature grid are traced constants).
    """
    cfg = export_model.setup_cfg(
        YAML, list(TINY_OPTS) + TEST_OPTS + ["MODEL.WEIGHTS", deploy_checkpoint]
    )
    image = export_model.preprocess(cfg, _image(0, 64, 64))
    model = export_model.build_deploy_model(cfg)
    with torch.no_grad():
        traced = torch.jit.trace(
            export_model.tracing_adapter(model, image), (image,), check_trace=False
        )
        same_size = export_model.preprocess(cfg, _image(2, 64, 64))
        ((boxes, classes, scores),) = _eager(cfg, [same_size])
        t_boxes, t_classes, t_scores = _traced_fields(traced(same_size))
        assert len(boxes) > 10
        torch.testing.assert_close(t_boxes, boxes, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(t_scores, scores, rtol=1e-5, atol=1e-6)
        assert torch.equal(t_classes, classes)

        other = export_model.preprocess(cfg, _image(1, 64, 96))
        boxes = model([{"image": other}])[0]["instances"].pred_boxes.tensor
        try:
            t_boxes = _traced_fields(traced(other))[0]
        except RuntimeError:  # an anchor index past the traced grid: refusing is fine too
            return
    assert t_boxes.shape != boxes.shape or not torch.allclose(t_boxes, boxes)


def test_a_trace_keeps_the_top_boxes_per_level_dynamic(deploy_checkpoint):
    """With fewer top refined boxes than anchors (as at COCO scale), how many fall on each level
    changes from image to image: the trace must not freeze those counts."""
    opts = TEST_OPTS + ["MODEL.MIMICDET.REFINE.TOPK_TEST", "20"]
    cfg = export_model.setup_cfg(
        YAML, list(TINY_OPTS) + opts + ["MODEL.WEIGHTS", deploy_checkpoint]
    )
    images = [export_model.preprocess(cfg, _image(seed, 64, 64)) for seed in range(5)]
    model = export_model.build_deploy_model(cfg)
    with torch.no_grad():
        traced = torch.jit.trace(
            export_model.tracing_adapter(model, images[0]), (images[0],), check_trace=False
        )
        for image, (boxes, classes, scores) in zip(images[1:], _eager(cfg, images[1:])):
            t_boxes, t_classes, t_scores = _traced_fields(traced(image))
            torch.testing.assert_close(t_boxes, boxes, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(t_scores, scores, rtol=1e-5, atol=1e-6)
            assert torch.equal(t_classes, classes)


def test_the_deploy_trace_runs_no_custom_op(deploy_checkpoint):
    """Inference evaluates the S-head's deformable conv at the top refined boxes with plain
    ATen ops, so a deploy graph (TorchScript, ONNX) needs no mapping of mimicdet's op."""
    cfg = export_model.setup_cfg(
        YAML, list(TINY_OPTS) + TEST_OPTS + ["MODEL.WEIGHTS", deploy_checkpoint]
    )
    image = export_model.preprocess(cfg, _image(0, 64, 64))
    model = export_model.build_deploy_model(cfg)
    with torch.no_grad():
        traced = torch.jit.trace(
            export_model.tracing_adapter(model, image), (image,), check_trace=False
        )
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert any(kind.startswith("aten::") for kind in kinds)
    assert not [kind for kind in kinds if kind.startswith("mimicdet::")]
