"""tools/export_model.py: the deploy model exported to TorchScript, to ONNX (run by onnxruntime)
and with torch.export gives the eager model's boxes; the op exports as ONNX's DeformConv."""

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

# the same for a torch.export program: torchvision registers the nms it calls
RUN_TORCH_EXPORT = """
import sys, torch, torchvision
import mimicdet.layers
program = torch.export.load(sys.argv[1])
images = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    torch.save([program.module()(image) for image in images], sys.argv[3])
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


def _assert_traced_matches_eager(output, eager):
    """The traced model's flat outputs hold the eager deploy model's detections."""
    boxes, classes, scores = eager
    t_boxes, t_classes, t_scores = _traced_fields(output)
    assert t_boxes.shape == boxes.shape
    torch.testing.assert_close(t_boxes, boxes, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(t_scores, scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(t_classes, classes)


def _trace(cfg, image):
    """The deploy model and its trace at ``image``'s size, as export_model.py traces it."""
    model = export_model.build_deploy_model(cfg)
    with torch.no_grad():
        traced = torch.jit.trace(
            export_model.tracing_adapter(model, image), (image,), check_trace=False
        )
    return model, traced


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

    for eager, output in zip(_eager(cfg, images), traced):
        assert len(eager[0]) > 10
        _assert_traced_matches_eager(output, eager)


def test_traced_model_is_tied_to_the_traced_input_size(tmp_path, deploy_checkpoint):
    """
    A trace gives the eager model's detections for any image of the traced size, and not for
    another size: the documented limit (anchors and the feature grid are traced constants).
    """
    cfg = export_model.setup_cfg(
        YAML, list(TINY_OPTS) + TEST_OPTS + ["MODEL.WEIGHTS", deploy_checkpoint]
    )
    model, traced = _trace(cfg, export_model.preprocess(cfg, _image(0, 64, 64)))
    with torch.no_grad():
        same_size = export_model.preprocess(cfg, _image(2, 64, 64))
        (eager,) = _eager(cfg, [same_size])
        assert len(eager[0]) > 10
        _assert_traced_matches_eager(traced(same_size), eager)

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
    _, traced = _trace(cfg, images[0])
    with torch.no_grad():
        for image, eager in zip(images[1:], _eager(cfg, images[1:])):
            _assert_traced_matches_eager(traced(image), eager)


def test_the_deploy_trace_runs_no_custom_op(deploy_checkpoint):
    """Inference evaluates the S-head's deformable conv at the top refined boxes with plain
    ATen ops, so a deploy graph (TorchScript, ONNX) needs no mapping of mimicdet's op."""
    cfg = export_model.setup_cfg(
        YAML, list(TINY_OPTS) + TEST_OPTS + ["MODEL.WEIGHTS", deploy_checkpoint]
    )
    _, traced = _trace(cfg, export_model.preprocess(cfg, _image(0, 64, 64)))
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert any(kind.startswith("aten::") for kind in kinds)
    assert not [kind for kind in kinds if kind.startswith("mimicdet::")]


@pytest.mark.parametrize(
    "channels,kernel,stride,padding,dilation,bias",
    [((8, 6), 3, 1, 1, 1, True), ((4, 5), 5, 2, 2, 2, False)],
)
def test_the_op_exports_as_onnx_deform_conv_and_onnxruntime_agrees(
    tmp_path, channels, kernel, stride, padding, dilation, bias
):
    """mimicdet::deform_conv2d -> ONNX DeformConv (opset 19): onnxruntime's CPU kernel gives the
    op's results (float32; measured max difference 6e-6), with and without a bias."""
    import onnx
    import onnxruntime

    from mimicdet.layers import deform_conv2d
    from mimicdet.layers.onnx import register_onnx_symbolic

    class DeformConv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(channels[1], channels[0], kernel, kernel))
            self.bias = torch.nn.Parameter(torch.randn(channels[1])) if bias else None

        def forward(self, x, offset):
            return deform_conv2d(x, offset, self.weight, self.bias, stride, padding, dilation)

    torch.manual_seed(0)
    module, (height, width) = DeformConv().eval(), (13, 10)
    out_h = (height + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    out_w = (width + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    x = torch.randn(2, channels[0], height, width)
    offset = 2 * torch.randn(2, 2 * kernel * kernel, out_h, out_w)  # taps well off the grid
    register_onnx_symbolic()
    path = str(tmp_path / "deform_conv.onnx")
    torch.onnx.export(module, (x, offset), path, opset_version=19, dynamo=False,
                      input_names=["x", "offset"])  # fmt: skip
    assert [node.op_type for node in onnx.load(path).graph.node] == ["DeformConv"]
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy(), "offset": offset.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), module(x, offset), rtol=0, atol=1e-4)

    # below opset 19 ONNX has no DeformConv: the exporter says so instead of writing a file
    with pytest.raises(Exception, match="mimicdet::deform_conv2d.*opset version 17"):
        torch.onnx.export(module, (x, offset), str(tmp_path / "old.onnx"), opset_version=17,
                          dynamo=False)  # fmt: skip


@pytest.mark.slow
def test_onnx_export_runs_in_onnxruntime_with_the_eager_models_detections(
    tmp_path, deploy_checkpoint
):
    opts = list(TINY_OPTS) + TEST_OPTS + ["MODEL.WEIGHTS", deploy_checkpoint]
    cfg = export_model.setup_cfg(YAML, opts)
    sample = tmp_path / "sample.png"
    cv2.imwrite(str(sample), _image(0, 48, 64))
    out = tmp_path / "onnx"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "export_model.py"), "--config-file", YAML]
        + ["--format", "onnx", "--output", str(out), "--sample-image", str(sample)]
        + opts,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # the tool checked onnxruntime against the eager model on the sample image itself
    assert "onnxruntime gives the eager model's detections" in result.stdout

    # and another image of the same size after resizing, compared here
    images = [export_model.preprocess(cfg, _image(s, 48, 64)) for s in (0, 1)]
    for image, (boxes, classes, scores) in zip(images, _eager(cfg, images)):
        assert len(boxes) > 10
        got_boxes, got_classes, got_scores, _ = export_model.run_onnx(
            str(out / "model.onnx"), image
        )
        assert got_boxes.shape == tuple(boxes.shape)
        torch.testing.assert_close(torch.from_numpy(got_boxes), boxes, rtol=0, atol=1e-3)
        torch.testing.assert_close(torch.from_numpy(got_scores), scores, rtol=0, atol=1e-5)
        assert np.array_equal(got_classes, classes.numpy())


def test_onnx_check_names_what_differs(tmp_path, deploy_checkpoint):
    """The tool's check fails when the file and the eager model disagree: here, a model exported
    with other weights."""
    from detectron2.modeling import build_model

    opts = list(TINY_OPTS) + TEST_OPTS
    cfg = export_model.setup_cfg(YAML, opts + ["MODEL.WEIGHTS", deploy_checkpoint])
    torch.manual_seed(1)
    other = tmp_path / "other.pth"
    torch.save({"model": build_model(export_model.setup_cfg(YAML, opts)).state_dict()}, other)
    image = export_model.preprocess(cfg, _image(0, 48, 64))
    path = export_model.export(
        export_model.setup_cfg(YAML, opts + ["MODEL.WEIGHTS", str(other)]), image, "onnx", tmp_path
    )
    mismatch = export_model.onnx_mismatch(path, cfg, image)
    # other weights: other detections, named by output (the count or the boxes differ first)
    assert mismatch is not None and mismatch.startswith("pred_boxes: "), mismatch


def _export_and_run_in_a_fresh_process(tmp_path, opts, images, name):
    """tools/export_model.py --format torch_export, then the .pt2 run on ``images`` by a fresh
    interpreter that imports only torch, torchvision and the op library."""
    sample = tmp_path / f"{name}.png"
    cv2.imwrite(str(sample), _image(0, 48, 64))
    out = tmp_path / name
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "export_model.py"), "--config-file", YAML]
        + ["--format", "torch_export", "--output", str(out), "--sample-image", str(sample)]
        + opts,
        check=True,
    )
    torch.save(images, tmp_path / f"{name}_images.pth")
    script = tmp_path / "run_pt2.py"
    script.write_text(RUN_TORCH_EXPORT)
    outputs = tmp_path / f"{name}_outputs.pth"
    subprocess.run(
        [sys.executable, str(script), str(out / "model.pt2"), str(tmp_path / f"{name}_images.pth")]
        + [str(outputs)],
        check=True,
    )
    return torch.load(outputs, weights_only=True)


@pytest.mark.slow
def test_torch_export_reloads_in_a_fresh_process_with_the_eager_models_detections(
    tmp_path, deploy_checkpoint
):
    opts = list(TINY_OPTS) + TEST_OPTS + ["MODEL.WEIGHTS", deploy_checkpoint]
    cfg = export_model.setup_cfg(YAML, opts)
    images = [export_model.preprocess(cfg, _image(s, 48, 64)) for s in (0, 1)]
    exported = _export_and_run_in_a_fresh_process(tmp_path, opts, images, "pt2")
    for (boxes, classes, scores), output in zip(_eager(cfg, images), exported):
        assert len(boxes) > 10
        e_boxes, e_classes, e_scores = _traced_fields(output)
        torch.testing.assert_close(e_boxes, boxes, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(e_scores, scores, rtol=1e-5, atol=1e-6)
        assert torch.equal(e_classes, classes)

    # no detection at all (a threshold no score passes) is a size like any other
    none = opts + ["MODEL.MIMICDET.S_HEAD.SCORE_THRESH_TEST", "1.0"]
    (output,) = _export_and_run_in_a_fresh_process(tmp_path, none, images[:1], "empty")
    boxes, classes, scores = _traced_fields(output)
    assert boxes.shape == (0, 4) and len(classes) == len(scores) == 0
