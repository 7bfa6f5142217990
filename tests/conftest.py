"""Shared fixtures: a tiny MimicDet config and synthetic inputs, sized for CPU tests."""

import os
import subprocess
import sys

import pytest
import torch
from detectron2.structures import Boxes, Instances

from mimicdet import get_mimicdet_cfg

# config overrides for a tiny model (R-18, narrow heads, 2 classes), e.g. for train_net;
# unit-variance inputs and GroupNorm keep a randomly initialised ResNet trainable
TINY_OPTS = [
    "MODEL.DEVICE", "cpu",
    "MODEL.WEIGHTS", "",
    "MODEL.PIXEL_STD", "[57.375, 57.120, 58.395]",
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.RESNETS.NORM", "GN",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.ROI_HEADS.NUM_CLASSES", "2",
    "MODEL.MIMICDET.REFINE.CONV_DIM", "32",
    "MODEL.MIMICDET.S_HEAD.CONV_DIM", "32",
    "MODEL.MIMICDET.S_HEAD.OFFSET_DIMS", "[8, 16]",
    "MODEL.MIMICDET.S_HEAD.FC_DIM", "64",
    "MODEL.MIMICDET.T_HEAD.CONV_DIM", "32",
    "MODEL.MIMICDET.T_HEAD.FC_DIM", "64",
]  # fmt: skip


ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
BASE_YAML = os.path.join(ROOT, "configs", "Base-MimicDet.yaml")


def tiny_cfg():
    """R-18 with narrow heads, 2 classes: builds and trains on 64-128 px images in seconds."""
    return get_mimicdet_cfg(BASE_YAML, TINY_OPTS)


@pytest.fixture
def tiny_opts():
    return list(TINY_OPTS)


@pytest.fixture
def cfg():
    return tiny_cfg()


@pytest.fixture
def make_inputs():
    return _make_inputs


def _make_inputs(num_images=2, size=96, boxes_per_image=((8, 8, 60, 50), (40, 30, 90, 90))):
    """Random images with the given GT boxes (class i % 2), in DatasetMapper's output format."""
    inputs = []
    for _ in range(num_images):
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor(boxes_per_image, dtype=torch.float32).reshape(-1, 4))
        inst.gt_classes = torch.arange(len(inst.gt_boxes)) % 2
        image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8).float()
        inputs.append({"image": image, "instances": inst, "height": size, "width": size})
    return inputs


def assert_same_detections(expected, got):
    """Two models' outputs (lists of ``{"instances": ...}``): per image at least one detection,
    and the same boxes, scores and classes, bit for bit."""
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        a, b = a["instances"], b["instances"]
        assert len(a) > 0
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_classes, b.pred_classes)


def _write_coco(root, num_images=4, size=96, seed=0):
    """
    Noise images with one or two solid rectangles (red = class 0, green = class 1) and their
    COCO json. Returns (json path, image dir).
    """
    import json
    import os

    import cv2
    import numpy as np

    rng = np.random.RandomState(seed)
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        image = rng.randint(0, 100, (size, size, 3)).astype(np.uint8)
        for k in range(1 + i % 2):
            w, h = rng.randint(size // 4, size // 2, size=2)
            x, y = rng.randint(0, size - w), rng.randint(0, size - h)
            category = (i + k) % 2
            image[y : y + h, x : x + w] = (0, 0, 255) if category == 0 else (0, 255, 0)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": category + 1,
                    "bbox": [int(x), int(y), int(w), int(h)],
                    "area": int(w * h),
                    "iscrowd": 0,
                }
            )
        cv2.imwrite(os.path.join(image_dir, f"{i}.png"), image)
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": size, "width": size})
    categories = [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]
    json_file = os.path.join(root, "coco.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return json_file, image_dir


@pytest.fixture
def tiny_coco(tmp_path):
    """Register a tiny COCO-format dataset (written under tmp_path); yields its name."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    def register(name, **kwargs):
        json_file, image_dir = _write_coco(str(tmp_path / name), **kwargs)
        register_coco_instances(name, {}, json_file, image_dir)
        names.append(name)
        return name

    names = []
    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


# detectron2 v0.6's launch() insists on CUDA and NCCL; this is its _distributed_worker with gloo.
# Each rank registers the dataset, runs train_net.main, and saves its model weights afterwards.
GLOO_WORKER = """
import json, os, sys
sys.path.insert(0, {root!r})
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import default_argument_parser
from detectron2.utils import comm
import train_net


def worker(rank, argv, port, out):
    torch.set_num_threads(1)
    url = f"tcp://127.0.0.1:{{port}}"
    dist.init_process_group("gloo", init_method=url, world_size=2, rank=rank)
    comm._LOCAL_PROCESS_GROUP = dist.new_group([0, 1])
    register_coco_instances({name!r}, {{}}, {json_file!r}, {image_dir!r})
    train = train_net.Trainer.train

    def train_and_save(self):
        ret = train(self)
        torch.save(self.model.module.state_dict(), os.path.join(out, f"rank{{rank}}.pth"))
        return ret

    train_net.Trainer.train = train_and_save
    results = train_net.main(default_argument_parser().parse_args(argv))
    if comm.is_main_process() and results:
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f)
    comm.synchronize()
    dist.destroy_process_group()


if __name__ == "__main__":
    port, out, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    os.makedirs(out, exist_ok=True)
    mp.spawn(worker, nprocs=2, args=(argv, port, out))
"""


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_script(tmp_path):
    """
    ``make(name, config_file)`` writes a tiny COCO dataset ``name`` and a 2-process gloo launcher
    of train_net; returns ``(run, json_file, image_dir)``, where ``run(argv, results_dir)`` trains
    (or evaluates) with ``config_file`` and the train_net flags and options ``argv``.
    """

    def make(name, config_file):
        import subprocess
        import sys

        json_file, image_dir = _write_coco(str(tmp_path / name), num_images=4, size=64)
        script = tmp_path / "launch_gloo.py"
        script.write_text(
            GLOO_WORKER.format(root=ROOT, name=name, json_file=json_file, image_dir=image_dir)
        )

        def run(argv, results_dir):
            cmd = [sys.executable, str(script), str(_free_port()), results_dir]
            subprocess.run(
                cmd + ["--config-file", str(config_file)] + argv, check=True, timeout=400
            )

        return run, json_file, image_dir

    return make


def run_beside_another_writer(command, output):
    """Runs a dataset preparation tool's ``command`` (an argv writing ``output``) while this
    process holds the folder's writer lock, as a second preparation would, until the tool prints
    its first line; returns the finished tool's ``CompletedProcess``."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from prepare_deepforest import one_writer_at_a_time

    with one_writer_at_a_time(output):
        tool = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first_line = tool.stdout.readline()
    stdout, stderr = tool.communicate(timeout=600)
    return subprocess.CompletedProcess(command, tool.returncode, first_line + stdout, stderr)
