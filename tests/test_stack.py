"""The installed stack: detectron2 as users import it, its detectors, evaluator and checkpoints."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from mimicdet import WeightsOnlyCheckpointer


def has_detectron2_ops():
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


def test_detectron2_imports_like_a_real_install(tmp_path):
    # A fresh interpreter outside the repo, detectron2.layers first, mimicdet never imported.
    script = (
        "import sys\n"
        "import detectron2.layers\n"
        "import detectron2.modeling, detectron2.engine, detectron2.evaluation, detectron2.data\n"
        "from detectron2 import model_zoo\n"
        "import os\n"
        "assert os.path.isfile(model_zoo.get_config_file('Base-RetinaNet.yaml'))\n"
        "assert model_zoo.get_config('common/train.py').train.max_iter > 0\n"
        "assert 'mimicdet' not in sys.modules\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_missing_compiled_ops_fail_on_use_with_a_clear_message():
    if has_detectron2_ops():
        pytest.skip("this detectron2 was built with its C++ ops")
    from detectron2.layers import rotated_boxes

    with pytest.raises(ImportError, match="use_fast_impl=False"):
        rotated_boxes.pairwise_iou_rotated(torch.zeros(1, 5), torch.zeros(1, 5))


def small_retinanet_cfg():
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RETINANET.NUM_CLASSES = 2
    cfg.INPUT.MIN_SIZE_TEST = 128
    cfg.INPUT.MAX_SIZE_TEST = 128
    return cfg


def synthetic_batch(num_images=2, size=128):
    generator = torch.Generator().manual_seed(0)
    batch = []
    for i in range(num_images):
        instances = Instances((size, size))
        boxes = [[10.0, 12.0, 60.0, 70.0], [70.0, 64.0, 120.0, 110.0]]
        instances.gt_boxes = Boxes(torch.tensor(boxes))
        instances.gt_classes = torch.tensor([0, 1])
        image = torch.randint(0, 255, (3, size, size), generator=generator).float()
        batch.append({"image": image, "instances": instances, "height": size, "width": size})
    return batch


def test_detectron2_retinanet_trains_and_infers_on_cpu():
    torch.manual_seed(0)
    model = build_model(small_retinanet_cfg())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch = synthetic_batch()
    totals = []
    model.train()
    for _ in range(2):
        with EventStorage():  # RetinaNet logs its number of positives to the event storage
            losses = model(batch)
        assert set(losses) == {"loss_cls", "loss_box_reg"}
        total = sum(losses.values())
        assert torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert totals[0] != totals[1]

    model.eval()
    with torch.no_grad():
        outputs = model([{"image": batch[0]["image"], "height": 256, "width": 256}])
    instances = outputs[0]["instances"]
    assert instances.image_size == (256, 256)
    assert {"pred_boxes", "scores", "pred_classes"} <= set(instances.get_fields())


GT_BOXES = {  # image id -> list of (x, y, w, h, category id)
    1: [(10, 10, 40, 30, 1), (60, 50, 30, 30, 2)],
    2: [(5, 20, 50, 50, 1)],
}


@pytest.fixture
def tiny_coco_dataset(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "height": 100, "width": 100} for i in GT_BOXES]
    annotations = []
    for image_id, boxes in GT_BOXES.items():
        for x, y, w, h, category in boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "category_id": category,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    json_file = tmp_path / "tiny.json"
    json_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    name = f"stack_test_tiny_{os.getpid()}_{tmp_path.name}"
    register_coco_instances(name, {}, str(json_file), str(tmp_path))
    DatasetCatalog.get(name)  # sets the contiguous id mapping in the metadata
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def evaluate_boxes(dataset_name, output_dir, shift):
    evaluator = COCOEvaluator(
        dataset_name, output_dir=str(output_dir), use_fast_impl=has_detectron2_ops()
    )
    evaluator.reset()
    for image_id, boxes in GT_BOXES.items():
        instances = Instances((100, 100))
        xyxy = [[x + shift, y + shift, x + w + shift, y + h + shift] for x, y, w, h, _ in boxes]
        instances.pred_boxes = Boxes(torch.tensor(xyxy, dtype=torch.float32))
        instances.scores = torch.ones(len(boxes))
        instances.pred_classes = torch.tensor([category - 1 for *_, category in boxes])
        evaluator.process([{"image_id": image_id}], [{"instances": instances}])
    return evaluator.evaluate()["bbox"]


def test_coco_evaluator_scores_perfect_and_shifted_predictions(tiny_coco_dataset, tmp_path):
    perfect = evaluate_boxes(tiny_coco_dataset, tmp_path / "perfect", shift=0)
    assert perfect["AP"] == pytest.approx(100.0)
    assert perfect["AP50"] == pytest.approx(100.0)
    # Shifted by 4 px every box still overlaps its GT at IoU >= 0.5, but not at the strict IoUs.
    shifted = evaluate_boxes(tiny_coco_dataset, tmp_path / "shifted", shift=4)
    assert shifted["AP50"] == pytest.approx(100.0)
    assert 0.0 < shifted["AP"] < 100.0


def test_checkpoint_round_trip_restores_weights_exactly(tmp_path):
    torch.manual_seed(0)
    model = build_model(small_retinanet_cfg())
    WeightsOnlyCheckpointer(model, save_dir=str(tmp_path)).save("model_test")

    torch.manual_seed(1)
    restored = build_model(small_retinanet_cfg())
    assert not torch.equal(
        model.head.cls_score.weight, restored.head.cls_score.weight
    ), "two seeds should give two different initialisations"
    WeightsOnlyCheckpointer(restored).load(str(tmp_path / "model_test.pth"))
    expected, actual = model.state_dict(), restored.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


class NotATensor:
    """Stands for anything that torch.load(weights_only=True) must refuse to unpickle."""


def test_checkpoint_with_arbitrary_objects_is_refused_with_its_file_name(tmp_path):
    model = torch.nn.Linear(2, 2)
    path = tmp_path / "unsafe.pth"
    torch.save({"model": model.state_dict(), "extra": NotATensor()}, path)
    with pytest.raises(RuntimeError, match="unsafe.pth"):
        WeightsOnlyCheckpointer(model).load(str(path))


def test_detectron2_pkl_checkpoints_keep_detectron2s_loader(tmp_path):
    model = torch.nn.Linear(2, 2)
    weights = {"weight": np.full((2, 2), 3.0, np.float32), "bias": np.zeros(2, np.float32)}
    path = tmp_path / "model_zoo_style.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": weights, "__author__": "test"}, f)
    WeightsOnlyCheckpointer(model).load(str(path))
    assert torch.equal(model.weight, torch.full((2, 2), 3.0))
