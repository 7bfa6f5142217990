"""Shipped configs: yaml and LazyConfig build the same model; schedules match the paper's."""

import os

import pytest
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.modeling import build_model

from mimicdet import add_mimicdet_config

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")
YAMLS = [
    "mimicdet_R_50_FPN_1x.yaml",
    "mimicdet_R_50_FPN_2x.yaml",
    "mimicdet_R_101_FPN_2x.yaml",
    "mimicdet_X_101_32x8d_FPN_2x.yaml",
]


def load_yaml(name):
    cfg = get_cfg()
    add_mimicdet_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, "COCO-Detection", name))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


@pytest.mark.parametrize("name", YAMLS)
def test_yaml_schedules(name):
    cfg = load_yaml(name)
    assert cfg.MODEL.META_ARCHITECTURE == "MimicDet"
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.BASE_LR == 0.01
    assert cfg.MODEL.WEIGHTS.startswith("detectron2://ImageNetPretrained/")
    if "_1x" in name:
        assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS) == (90000, (60000, 80000))
        assert cfg.INPUT.MIN_SIZE_TRAIN == (800,)
    else:
        assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS) == (180000, (120000, 160000))
        assert min(cfg.INPUT.MIN_SIZE_TRAIN) == 640 and max(cfg.INPUT.MIN_SIZE_TRAIN) == 800


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_yaml_and_lazyconfig_build_the_same_model():
    yaml_model = build_model(load_yaml("mimicdet_R_50_FPN_1x.yaml"))
    lazy = LazyConfig.load(os.path.join(CONFIGS, "COCO-Detection", "mimicdet_R_50_FPN_1x.py"))
    lazy_model = instantiate(lazy.model)
    assert _shapes(yaml_model) == _shapes(lazy_model)
    frozen = {n for n, p in yaml_model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, p in lazy_model.named_parameters() if not p.requires_grad}
    for attr in ["num_classes", "mimic_paths", "mimic_per_image", "detach_teacher", "loss_weights"]:
        assert getattr(yaml_model, attr) == getattr(lazy_model, attr), attr
    for attr in ["staggered", "pool_levels", "batch_size_per_image", "positive_fraction"]:
        assert getattr(yaml_model.roi_heads, attr) == getattr(lazy_model.roi_heads, attr), attr
    refine_attrs = ["levels", "topk_test", "nms_thresh_train", "center_sampling_ratio"]
    for attr in refine_attrs + ["ignore_sampling_ratio", "focal_loss_alpha", "focal_loss_gamma"]:
        assert getattr(yaml_model.refinement, attr) == getattr(lazy_model.refinement, attr), attr
    assert yaml_model.refinement.box_reg_loss_type == lazy_model.refinement.box_reg_loss_type
    assert yaml_model.s_head.box_reg_loss_type == lazy_model.s_head.box_reg_loss_type
    t_losses = [m.roi_heads.box_predictor.box_reg_loss_type for m in (yaml_model, lazy_model)]
    assert t_losses[0] == t_losses[1]


def test_lazyconfig_training_setup():
    lazy = LazyConfig.load(os.path.join(CONFIGS, "COCO-Detection", "mimicdet_R_50_FPN_1x.py"))
    assert lazy.optimizer.lr == 0.01
    assert lazy.dataloader.train.total_batch_size == 16
    assert lazy.train.max_iter == 90000
    assert lazy.train.init_checkpoint == "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    assert list(lazy.dataloader.train.mapper.augmentations[0].short_edge_length) == [800]
    assert lazy.model.num_classes == 80
