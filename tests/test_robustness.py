"""Training and inference on awkward inputs: a NaN loss, tiny and elongated images, no boxes."""

import json
import math
import os
import re
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage, get_event_storage

from mimicdet.data import MimicDetDatasetMapper
from mimicdet.modeling.meta_arch import MimicDet

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, ROOT)
import train_net  # noqa: E402

YAML = os.path.join(ROOT, "configs", "COCO-Detection", "mimicdet_R_50_FPN_1x.yaml")


def _run(argv):
    return train_net.main(default_argument_parser().parse_args(argv))


def _train_opts(name, out, size=64, max_iter=3):
    return [
        "DATASETS.TRAIN", f"('{name}',)",
        "DATASETS.TEST", "()",
        "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.BASE_LR", "0.005",
        "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.CHECKPOINT_PERIOD", "100",
        "INPUT.MIN_SIZE_TRAIN", f"({size},)",
        "INPUT.MAX_SIZE_TRAIN", str(size),
        "TEST.EVAL_PERIOD", "0",
        "OUTPUT_DIR", out,
    ]  # fmt: skip


def test_nan_loss_stops_training_naming_the_iteration_and_the_loss_terms(
    tmp_path, tiny_coco, tiny_opts, monkeypatch
):
    forward_training = MimicDet.forward_training

    def nan_at_iteration_1(self, *args):
        losses = forward_training(self, *args)
        if get_event_storage().iter == 1:
            losses["loss_s_box"] = losses["loss_s_box"] * float("nan")
        return losses

    monkeypatch.setattr(MimicDet, "forward_training", nan_at_iteration_1)
    name = tiny_coco("mimicdet_tiny_nan", size=64)
    out = str(tmp_path / "out")
    with pytest.raises(FloatingPointError) as e:
        _run(["--config-file", YAML] + tiny_opts + _train_opts(name, out))
    message = str(e.value)
    assert "iteration=1" in message
    for term in ["loss_refine_cls", "loss_s_box", "loss_t_cls", "loss_mimic_cls"]:
        assert term in message
    # numpy >= 2 prints the value as np.float64(nan)
    assert re.search(r"'loss_s_box': (np\.float64\()?nan", message), message
    assert not os.path.exists(os.path.join(out, "model_final.pth"))


@pytest.mark.parametrize("height, width", [(32, 32), (64, 2000), (2000, 64)])
def test_tiny_and_elongated_images_train_and_infer(cfg, tmp_path, height, width):
    """Through the training and test mappers (resize to short edge 64, long edge at most 256)."""
    cfg.merge_from_list(
        [
            "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "256",
            "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "256",
            "MODEL.MIMICDET.S_HEAD.SCORE_THRESH_TEST", "0.0",
        ]
    )  # fmt: skip
    path = str(tmp_path / "image.png")
    cv2.imwrite(path, np.random.RandomState(0).randint(0, 256, (height, width, 3), np.uint8))
    box = [width * 0.25, height * 0.25, width * 0.75, height * 0.75]
    record = {
        "file_name": path,
        "image_id": 0,
        "height": height,
        "width": width,
        "annotations": [{"bbox": box, "bbox_mode": 0, "category_id": 1}],
    }
    torch.manual_seed(0)
    model = build_model(cfg)

    train_inputs = [MimicDetDatasetMapper(cfg, is_train=True)(dict(record)) for _ in range(2)]
    with EventStorage():
        losses = model(train_inputs)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()

    model.eval()
    with torch.no_grad():
        test_input = MimicDetDatasetMapper(cfg, is_train=False)(dict(record))
        inst = model([test_input])[0]["instances"]
    assert len(inst) > 0
    assert inst.image_size == (height, width)
    boxes = inst.pred_boxes.tensor
    assert (boxes[:, 0::2] <= width).all() and (boxes[:, 1::2] <= height).all()


@pytest.mark.slow
def test_a_dataset_of_only_empty_images_trains(tmp_path, tiny_coco, tiny_opts):
    name = tiny_coco("mimicdet_tiny_empty", size=64)
    json_file = tmp_path / name / "coco.json"
    coco = json.loads(json_file.read_text())
    coco["annotations"] = []
    json_file.write_text(json.dumps(coco))
    out = str(tmp_path / "out")
    opts = tiny_opts + _train_opts(name, out) + ["DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False"]
    _run(["--config-file", YAML] + opts)
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    assert metrics[-1]["iteration"] == 2
    assert all(math.isfinite(m["total_loss"]) for m in metrics if "total_loss" in m)
