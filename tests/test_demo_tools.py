"""The DeepForest configs, tools/demo.py and tools/benchmark.py (CPU, small inputs)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model
from detectron2.modeling.meta_arch.fcos import FCOS
from PIL import Image

import mimicdet  # noqa: F401 registers the backbones and datasets
from mimicdet import get_mimicdet_cfg

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "DeepForest"
YAMLS = [
    "mimicdet_MNV2_FPN.yaml",
    "mimicdet_MNV2_FPN_nomimic.yaml",
    "retinanet_MNV2_FPN.yaml",
    "mimicdet_MNV2_FPN_separate.yaml",
    "faster_rcnn_MNV2_FPN.yaml",
]
# no ImageNet file reads: the tests check structure, not weights
NO_WEIGHTS = ["MODEL.MOBILENET.IMAGENET_WEIGHTS", ""]
sys.path.insert(0, str(REPO / "tools"))


def yaml_cfg(name, opts=()):
    return get_mimicdet_cfg(CONFIGS / name, NO_WEIGHTS + list(opts))


def lazy_fcos():
    cfg = LazyConfig.load(str(CONFIGS / "fcos_MNV2_FPN.py"))
    cfg.model.backbone.bottom_up.imagenet_weights = ""
    return cfg


def inference_backbone_shapes(model):
    """Parameter name -> shape of the backbone modules that run at inference."""
    from convert_to_deploy import training_only_keys

    params = {f"backbone.{n}": tuple(p.shape) for n, p in model.backbone.named_parameters()}
    if type(model).__name__ == "MimicDet":
        for key in training_only_keys(params):
            params.pop(key)
    return params


@pytest.mark.parametrize("name", YAMLS)
def test_yaml_configs_build(name):
    model = build_model(yaml_cfg(name))
    assert model.backbone.output_shape()["p7"].stride == 128


def test_fcos_config_builds_and_matches_the_shared_values():
    cfg, base = lazy_fcos(), yaml_cfg("Base-DeepForest-MNV2.yaml")
    model = instantiate(cfg.model)
    assert isinstance(model, FCOS)  # detectron2's (as Float32BoxFCOS, test_fcos.py)
    train_aug = cfg.dataloader.train.mapper.augmentations[0]
    assert tuple(train_aug.short_edge_length) == tuple(base.INPUT.MIN_SIZE_TRAIN)
    assert train_aug.max_size == base.INPUT.MAX_SIZE_TRAIN
    assert cfg.dataloader.test.mapper.augmentations[0].short_edge_length == base.INPUT.MIN_SIZE_TEST
    assert cfg.dataloader.train.mapper.image_format == base.INPUT.FORMAT
    assert cfg.dataloader.train.total_batch_size == base.SOLVER.IMS_PER_BATCH
    assert cfg.train.max_iter == base.SOLVER.MAX_ITER
    assert cfg.optimizer.lr == base.SOLVER.BASE_LR
    assert list(cfg.lr_multiplier.scheduler.milestones[:-1]) == list(base.SOLVER.STEPS)
    assert list(cfg.model.pixel_mean) == list(base.MODEL.PIXEL_MEAN)
    assert list(cfg.model.pixel_std) == list(base.MODEL.PIXEL_STD)


def test_fcos_box_outputs_tell_a_dead_regression_branch_from_a_live_one():
    """The share of box outputs above zero: the ReLU that decodes them passes nothing of a
    branch biased below zero (as FCOS's seed 2 on DeepForest ended), all of one above it."""
    from fcos_box_outputs import box_output_stats

    model = instantiate(lazy_fcos().model)
    batches = [[{"image": torch.rand(3, 96, 128) * 255, "height": 96, "width": 128}]]
    for bias, expected in ((-5.0, 0.0), (5.0, 1.0)):
        torch.nn.init.constant_(model.head.bbox_pred.bias, bias)
        stats = box_output_stats(model, batches)
        assert stats["above_zero"] == pytest.approx(expected, abs=0.01)
        assert stats["count"] == 4 * sum(  # four sides at every location of every level
            ((96 + s - 1) // s) * ((128 + s - 1) // s) for s in (8, 16, 32, 64, 128)
        )


def test_rank_candidates_counts_fewer_candidates_under_the_rpns_stricter_matcher():
    """tools/rank_candidates.py, the measurement behind docs/distillation.md's candidate counts:
    per GT, the candidates the distiller's assigner would give it. An RPN's 0.7 matcher keeps
    the one anchor equal to a GT, RetinaNet's own 0.5 matcher its neighbours too."""
    from types import SimpleNamespace

    from detectron2.modeling.matcher import Matcher
    from detectron2.structures import Boxes, Instances
    from rank_candidates import SIZE_EDGES, count_candidates

    cfg = yaml_cfg("retinanet_MNV2_FPN.yaml")
    cfg.MODEL.DEVICE = "cpu"
    student = build_model(cfg).eval()
    image = torch.rand(3, 128, 128) * 255
    with torch.no_grad():
        features = student.backbone(student.preprocess_image([{"image": image}]).tensor)
    p3_anchors = student.anchor_generator([features[f] for f in student.head_in_features])[0]
    centre = p3_anchors.tensor[:, :2].add(p3_anchors.tensor[:, 2:]).div(2)
    sides = p3_anchors.tensor[:, 2] - p3_anchors.tensor[:, 0]
    # a 32 px anchor near the middle of the image, as the GT
    own = ((centre - 64).abs().sum(dim=1) + (sides - 32).abs() * 100).argmin()
    instances = Instances((128, 128), gt_boxes=Boxes(p3_anchors.tensor[own : own + 1]))
    instances.gt_classes = torch.tensor([0])
    rpn = SimpleNamespace(anchor_matcher=Matcher([0.3, 0.7], [0, -1, 1], True))
    counts = count_candidates(
        student, {"rpn": rpn, "own": student}, [[{"image": image, "instances": instances}]]
    )
    bucket = SIZE_EDGES.index(32)  # 32-64 px
    assert counts["rpn"][bucket] == [1]
    assert counts["own"][bucket][0] > 1


def test_yaml_configs_share_input_and_schedule():
    keys = ["INPUT", "SOLVER", "DATASETS", "DATALOADER", "TEST"]
    base = yaml_cfg("Base-DeepForest-MNV2.yaml")
    for name in YAMLS:
        cfg = yaml_cfg(name)
        for key in keys:
            assert cfg[key] == base[key], f"{name} changes {key}"
        assert cfg.MODEL.MOBILENET == base.MODEL.MOBILENET
        assert cfg.MODEL.PIXEL_MEAN == base.MODEL.PIXEL_MEAN


def test_detectors_share_test_time_nms_and_detections_per_image():
    """The benchmark compares detectors, so their post-processing must be the same."""
    retinanet = build_model(yaml_cfg("retinanet_MNV2_FPN.yaml"))
    fcos = instantiate(lazy_fcos().model)
    for name in YAMLS[:2]:
        ours = build_model(yaml_cfg(name))
        for other in (retinanet, fcos):
            assert ours.test_nms_thresh == other.test_nms_thresh, (name, type(other))
            assert ours.max_detections_per_image == other.max_detections_per_image
    # the two-stage reference (and distillation teacher) too
    frcnn = build_model(yaml_cfg("faster_rcnn_MNV2_FPN.yaml")).roi_heads.box_predictor
    assert (frcnn.test_score_thresh, frcnn.test_nms_thresh, frcnn.test_topk_per_image) == (
        retinanet.test_score_thresh,
        retinanet.test_nms_thresh,
        retinanet.max_detections_per_image,
    )


def test_inference_backbones_are_identical():
    reference = inference_backbone_shapes(build_model(yaml_cfg("retinanet_MNV2_FPN.yaml")))
    assert "backbone.fpn_lateral3.weight" in reference
    for name in YAMLS[:2]:
        assert inference_backbone_shapes(build_model(yaml_cfg(name))) == reference
    assert inference_backbone_shapes(instantiate(lazy_fcos().model)) == reference


def test_mimicdet_training_pyramid_adds_p2():
    model = build_model(yaml_cfg("mimicdet_MNV2_FPN.yaml"))
    images = torch.zeros(1, 3, 64, 64)
    assert set(model.backbone.train()(images)) == {"p2", "p3", "p4", "p5", "p6", "p7"}
    assert set(model.backbone.eval()(images)) == {"p3", "p4", "p5", "p6", "p7"}


def random_init_weights(tmp_path):
    """A checkpoint of a randomly initialised mimicdet_MNV2_FPN model; returns its path."""
    weights = tmp_path / "model.pth"
    torch.save({"model": build_model(yaml_cfg("mimicdet_MNV2_FPN.yaml")).state_dict()}, weights)
    return weights


def test_demo_writes_pictures(tmp_path):
    from demo import main

    weights = random_init_weights(tmp_path)
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image_dir / "tile.png")
    out = tmp_path / "out"
    main(
        ["--config-file", str(CONFIGS / "mimicdet_MNV2_FPN.yaml"), "--input", str(image_dir),
         "--output", str(out), "--confidence-threshold", "0.0",
         "--opts", "MODEL.WEIGHTS", str(weights), *NO_WEIGHTS]
    )  # fmt: skip
    picture = np.asarray(Image.open(out / "tile.png"))
    assert picture.shape == (96, 128, 3)


def test_demo_missing_input_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "demo.py"), "--config-file",
         str(CONFIGS / "mimicdet_MNV2_FPN.yaml"), "--input", str(tmp_path / "nope.png"),
         "--output", str(tmp_path / "out")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode != 0
    assert "nope.png: no such file or folder" in result.stderr


@pytest.mark.slow
def test_demo_loop_keeps_memory_flat(tmp_path):
    """
    tools/soak_demo.py's measurement on a short run, target under 5% RSS growth after the
    warm-up. Without demo.release_freed_memory this grew 51% (glibc heap fragmentation over
    varied image sizes); keeping one feature map per image (~1.6 MiB at P3) would add ~8%.
    """
    from soak_demo import soak, write_images

    from demo import Predictor

    weights = random_init_weights(tmp_path)
    predictor = Predictor(
        CONFIGS / "mimicdet_MNV2_FPN.yaml", ["MODEL.WEIGHTS", str(weights), *NO_WEIGHTS]
    )
    # random pixels, 200..400 px sides: the same images with or without datasets/ prepared
    paths = write_images(tmp_path / "images", 90, sources=[])
    result = soak(predictor, paths, tmp_path / "pictures", warmup=10, confidence_threshold=0.0)
    assert len(list((tmp_path / "pictures").glob("*.png"))) == 90
    assert result["growth_percent"] < 5, result


def test_evaluate_teacher_scores_both_heads_and_their_mixes_and_refuses_a_deploy_checkpoint(
    tmp_path, tiny_coco, tiny_opts
):
    from convert_to_deploy import convert
    from evaluate_teacher import main as evaluate_teacher

    name = tiny_coco("mimicdet_tiny_teacher")
    yaml = str(REPO / "configs" / "COCO-Detection" / "mimicdet_R_50_FPN_1x.yaml")
    cfg = get_mimicdet_cfg(yaml, tiny_opts)
    full, deploy = str(tmp_path / "model_final.pth"), str(tmp_path / "model_deploy.pth")
    torch.save({"model": build_model(cfg).state_dict()}, full)
    convert(full, deploy)
    opts = tiny_opts + [
        "DATASETS.TEST", f"('{name}',)",
        "DATALOADER.NUM_WORKERS", "0",
        "INPUT.MIN_SIZE_TEST", "96",
        "INPUT.MAX_SIZE_TEST", "96",
    ]  # fmt: skip

    out = tmp_path / "teacher.json"
    args = ["--config-file", yaml, "--output", str(out)]
    results = evaluate_teacher(args + opts + ["MODEL.WEIGHTS", full])
    assert set(results) == {"s_head", "t_head"}
    results = evaluate_teacher(args + ["--mixed"] + opts + ["MODEL.WEIGHTS", full])
    written = json.loads(out.read_text())
    assert set(results) == {"s_head", "t_head", "t_classes_s_boxes", "s_classes_t_boxes"}
    for head in results:
        assert set(results[head]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert written[head] == pytest.approx(results[head], nan_ok=True)
    assert written["dataset"] == name

    with pytest.raises(SystemExit, match="no T-head weights"):
        evaluate_teacher(args + opts + ["MODEL.WEIGHTS", deploy])


def test_mimic_agreement_measures_both_paths_of_a_checkpoint_trained_without_mimicking(
    tmp_path, tiny_coco, tiny_opts
):
    """The same seed gives the same pairs, so two checkpoints compare on the same boxes; a
    no-mimicking checkpoint is measured on both paths; a deploy checkpoint is refused."""
    from convert_to_deploy import convert
    from mimic_agreement import main as mimic_agreement
    from mimic_agreement import recording_mimic_pairs

    name = tiny_coco("mimicdet_tiny_agreement")
    yaml = str(REPO / "configs" / "COCO-Detection" / "mimicdet_R_50_FPN_1x.yaml")
    cfg = get_mimicdet_cfg(yaml, tiny_opts + ["MODEL.MIMICDET.MIMIC.ENABLED", "False"])
    full, deploy = str(tmp_path / "model_final.pth"), str(tmp_path / "model_deploy.pth")
    torch.save({"model": build_model(cfg).state_dict()}, full)
    convert(full, deploy)
    opts = tiny_opts + [
        "MODEL.MIMICDET.MIMIC.ENABLED", "False",
        "DATASETS.TRAIN", f"('{name}',)",
        "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "2",
        "INPUT.MIN_SIZE_TRAIN", "(96,)",
        "INPUT.MAX_SIZE_TRAIN", "96",
    ]  # fmt: skip
    args = ["--config-file", yaml, "--batches", "2", "--output", str(tmp_path / "a.json")]

    result = mimic_agreement(args + opts + ["MODEL.WEIGHTS", full])
    assert 0.0 <= result["loss_mimic_cls"] <= 2.0 and 0.0 <= result["loss_mimic_reg"] <= 2.0
    assert 0 < result["pairs"] <= 2 * cfg.MODEL.MIMICDET.MIMIC.NUM_PER_IMAGE
    for head in ("s", "t"):
        assert 0.0 <= result[f"{head}_prob_of_background_negatives"] <= 1.0
        assert result[f"{head}_logit_norm"] > 0.0
    # a random model may refine no box onto an object: no label probability (NaN) then
    same = pytest.approx(result, nan_ok=True)
    assert json.loads((tmp_path / "a.json").read_text()) == same
    assert mimic_agreement(args + opts + ["MODEL.WEIGHTS", full]) == same
    assert mimic_agreement(args + ["--seed", "1"] + opts + ["MODEL.WEIGHTS", full]) != same

    # --gradients measures the very same pairs, and adds the losses' gradients on the shared convs
    graded = mimic_agreement(args + ["--gradients"] + opts + ["MODEL.WEIGHTS", full])
    assert {key: graded[key] for key in result} == same
    for group in ("shared", "backbone"):
        for name in ("s_cls", "mimic_cls", "s_box", "mimic_reg"):
            assert graded[f"{group}_grad_norm_{name}"] > 0.0
        assert -1.0 <= graded[f"{group}_grad_cos_s_cls_mimic_reg"] <= 1.0

    with pytest.raises(SystemExit, match="no T-head weights"):
        mimic_agreement(args + opts + ["MODEL.WEIGHTS", deploy])
    # the tool switches mimicking on to measure; a caller that leaves it off is told so
    with pytest.raises(ValueError, match="mimicking off"):
        with recording_mimic_pairs(build_model(cfg)):
            pass


def test_gradient_statistics_compare_each_losss_pull_on_the_shared_parameters():
    from mimic_agreement import gradient_statistics

    weight, bias = torch.zeros(2, requires_grad=True), torch.zeros(1, requires_grad=True)
    losses = {
        "a": weight @ torch.tensor([3.0, 4.0]),  # gradient (3, 4, 0)
        "b": weight @ torch.tensor([-3.0, -4.0]) + 2 * bias.sum(),  # (-3, -4, 2)
        "c": torch.tensor(1.0, requires_grad=True) * 5,  # reaches neither: zeros
    }
    stats = gradient_statistics(losses, {"g": [weight, bias]}, names=("a", "b", "c"))
    assert all(key.startswith("g_grad_") for key in stats)
    stats = {key.removeprefix("g_"): value for key, value in stats.items()}
    assert stats["grad_norm_a"] == pytest.approx(5.0)
    assert stats["grad_norm_b"] == pytest.approx(29**0.5)
    assert stats["grad_norm_c"] == 0.0
    assert stats["grad_cos_a_b"] == pytest.approx(-25 / (5 * 29**0.5))
    assert math.isnan(stats["grad_cos_a_c"]) and math.isnan(stats["grad_cos_b_c"])
    assert weight.grad is None  # measured, never accumulated into the parameters
    # one backward a loss, split by group: each group gets its own part of the gradient
    split = gradient_statistics(losses, {"w": [weight], "v": [bias]}, names=("a", "b"))
    assert split["w_grad_norm_b"] == pytest.approx(5.0) and split["v_grad_norm_b"] == 2.0
    assert split["v_grad_norm_a"] == 0.0 and split["w_grad_cos_a_b"] == pytest.approx(-1.0)

    with pytest.raises(ValueError, match=r"no \['d'\]"):
        gradient_statistics(losses, {"g": [weight]}, names=("a", "d"))
