"""Shipped configs: yaml and LazyConfig build the same model; schedules match the paper's."""

import os
import sys

import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import CfgNode, LazyConfig, get_cfg, instantiate
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from omegaconf import DictConfig, ListConfig
from torch import nn

from mimicdet import add_distill_config, add_mimicdet_config, get_mimicdet_cfg

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
CONFIGS = os.path.join(ROOT, "configs")
YAMLS = [
    "mimicdet_R_50_FPN_1x.yaml",
    "mimicdet_R_50_FPN_2x.yaml",
    "mimicdet_R_101_FPN_2x.yaml",
    "mimicdet_X_101_32x8d_FPN_2x.yaml",
]


def load_yaml(name):
    cfg = get_mimicdet_cfg(os.path.join(CONFIGS, "COCO-Detection", name))
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


def _settings(obj, depth=0):
    """Every plain setting of a module or helper object, recursively (not its tensors)."""
    if isinstance(obj, (bool, int, float, str, type(None))):
        return obj
    if isinstance(obj, (list, tuple, ListConfig)):
        return [_settings(x, depth) for x in obj]
    if isinstance(obj, (dict, DictConfig)):
        return {k: _settings(v, depth) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor) or not hasattr(obj, "__dict__") or depth > 6:
        return type(obj).__name__
    attrs = {k: v for k, v in vars(obj).items() if not k.startswith("_") and k != "training"}
    if isinstance(obj, nn.Module):
        attrs.update(obj._modules)
    return type(obj).__name__, {k: _settings(v, depth + 1) for k, v in sorted(attrs.items())}


def test_yaml_and_lazyconfig_build_the_same_model():
    yaml_model = build_model(load_yaml("mimicdet_R_50_FPN_1x.yaml"))
    lazy = LazyConfig.load(os.path.join(CONFIGS, "COCO-Detection", "mimicdet_R_50_FPN_1x.py"))
    lazy_model = instantiate(lazy.model)
    assert _shapes(yaml_model) == _shapes(lazy_model)
    frozen = {n for n, p in yaml_model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, p in lazy_model.named_parameters() if not p.requires_grad}
    # every setting of every module: thresholds, top-k, matchers, level rules, test filtering
    for name in ["", "refinement", "s_head", "roi_heads", "backbone"]:
        yaml_part, lazy_part = yaml_model.get_submodule(name), lazy_model.get_submodule(name)
        assert _settings(yaml_part) == _settings(lazy_part), name or "MimicDet"


def test_lazyconfig_training_setup():
    lazy = LazyConfig.load(os.path.join(CONFIGS, "COCO-Detection", "mimicdet_R_50_FPN_1x.py"))
    assert lazy.optimizer.lr == 0.01
    assert lazy.dataloader.train.total_batch_size == 16
    assert lazy.train.max_iter == 90000
    assert lazy.train.init_checkpoint == "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    assert list(lazy.dataloader.train.mapper.augmentations[0].short_edge_length) == [800]
    assert lazy.model.num_classes == 80


def _flat(cfg, prefix=""):
    out = {}
    for key, value in cfg.items():
        if isinstance(value, CfgNode):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_add_mimicdet_config_adds_keys_and_changes_none_of_detectron2s():
    default = _flat(get_cfg())
    ours = get_cfg()
    add_mimicdet_config(ours)
    ours = _flat(ours)
    assert {k: ours[k] for k in default} == default
    added = set(ours) - set(default)
    assert added and all(
        k.startswith(("MODEL.MIMICDET.", "MODEL.MOBILENET.")) or k == "INPUT.RANDOM_FLIP_VERTICAL"
        for k in added
    ), sorted(added)


def test_get_mimicdet_cfg_reads_what_train_net_reads_file_then_opts():
    """Every yacs entry point reads configs with get_mimicdet_cfg: a distiller's (MODEL.DISTILL)
    as well as MimicDet's, with opts merged after the file, and detectron2's defaults kept."""
    path = os.path.join(DISTILL_CONFIGS, "retinanet_fgfi_from_frcnn.yaml")
    cfg = get_mimicdet_cfg(path, ["SOLVER.BASE_LR", "0.123"])
    assert cfg.MODEL.META_ARCHITECTURE == "Distiller" and cfg.MODEL.DISTILL.FGFI.WEIGHT > 0
    assert cfg.SOLVER.BASE_LR == 0.123 and not cfg.is_frozen()
    plain = get_cfg()
    add_mimicdet_config(plain)
    with pytest.raises(KeyError, match="MODEL.DISTILL"):
        plain.merge_from_file(path)
    defaults = _flat(get_mimicdet_cfg())
    assert all(defaults[k] == v for k, v in _flat(get_cfg()).items())


def test_add_distill_config_adds_only_model_distill():
    default = _flat(get_cfg())
    ours = get_cfg()
    add_distill_config(ours)
    ours = _flat(ours)
    assert {k: ours[k] for k in default} == default
    added = set(ours) - set(default)
    assert added and all(k.startswith("MODEL.DISTILL.") for k in added), sorted(added)


def test_a_detectron2_yaml_through_our_train_net_builds_detectron2s_model(tmp_path):
    sys.path.insert(0, ROOT)
    import train_net

    yaml = model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml")
    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "OUTPUT_DIR", str(tmp_path)]
    args = default_argument_parser().parse_args(["--config-file", yaml] + opts)
    ours = train_net.setup_yaml(args)
    theirs = get_cfg()
    theirs.merge_from_file(yaml)
    theirs.merge_from_list(opts)
    ours_flat = _flat(ours)
    assert {k: ours_flat[k] for k in _flat(theirs)} == _flat(theirs)

    torch.manual_seed(0)
    our_model = build_model(ours)
    torch.manual_seed(0)
    their_model = build_model(theirs)
    assert type(our_model) is type(their_model)
    assert str(our_model) == str(their_model)
    theirs_state = their_model.state_dict()
    assert our_model.state_dict().keys() == theirs_state.keys()
    assert all(torch.equal(v, theirs_state[k]) for k, v in our_model.state_dict().items())


def test_deepforest_mimicdet_sets_the_t_head_keys_as_the_base_config():
    """The DeepForest config cannot inherit Base-MimicDet.yaml; it repeats its T-head keys."""
    base = _flat(get_mimicdet_cfg(os.path.join(CONFIGS, "Base-MimicDet.yaml")))
    deepforest = _flat(
        get_mimicdet_cfg(os.path.join(CONFIGS, "DeepForest", "mimicdet_MNV2_FPN.yaml"))
    )
    # what the DeepForest config changes on purpose (commented there)
    own = {"MODEL.ROI_HEADS.NUM_CLASSES", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE"}
    keys = [
        k
        for k in base
        if k.startswith(("MODEL.ROI_HEADS.", "MODEL.ROI_BOX_HEAD."))
        and k not in own
        and base[k] != _flat(get_cfg())[k]
    ]
    assert (
        "MODEL.ROI_HEADS.IOU_THRESHOLDS" in keys and "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION" in keys
    )
    for key in keys + ["MODEL.META_ARCHITECTURE", "MODEL.FPN.IN_FEATURES"]:
        assert deepforest[key] == base[key], key


DISTILL_CONFIGS = os.path.join(CONFIGS, "DeepForest", "distill")
DISTILLED = sorted(
    f for f in os.listdir(DISTILL_CONFIGS) if "_from_" in f and f != "fcos_from_frcnn.py"
)


def _distill_yaml(name):
    return get_mimicdet_cfg(os.path.join(DISTILL_CONFIGS, name))


@pytest.mark.parametrize("name", DISTILLED)
def test_a_distilled_deepforest_student_differs_from_its_baseline_by_distillation_only(name):
    """Same data, schedule, seed and student as the undistilled baseline; a teacher config that
    exists; a model that builds (with the teacher's random weights: no checkpoint in CI)."""
    if name.endswith(".yaml"):
        cfg, baseline = _distill_yaml(name), _distill_yaml("retinanet_MNV2_FPN_student.yaml")
        ours, theirs = _flat(cfg), _flat(baseline)
        changed = {k for k in ours if ours[k] != theirs[k]}
        assert changed <= {"MODEL.META_ARCHITECTURE", "OUTPUT_DIR"} | {
            k for k in ours if k.startswith("MODEL.DISTILL.")
        }, sorted(changed)
        assert cfg.MODEL.DISTILL.STUDENT_META_ARCHITECTURE == baseline.MODEL.META_ARCHITECTURE
        teacher = cfg.MODEL.DISTILL.TEACHER
        assert os.path.isfile(os.path.join(ROOT, teacher.CONFIG_FILE))
        cfg.MODEL.DISTILL.TEACHER.WEIGHTS, cfg.MODEL.DISTILL.TEACHER.ALLOW_RANDOM = "", True
        cfg.MODEL.DEVICE = "cpu"
        cwd = os.getcwd()
        os.chdir(ROOT)  # teacher paths are relative to the repository, as train_net runs
        try:
            model = build_model(cfg)
        finally:
            os.chdir(cwd)
    else:
        cfg = LazyConfig.load(os.path.join(DISTILL_CONFIGS, name))
        baseline = LazyConfig.load(os.path.join(DISTILL_CONFIGS, "fcos_MNV2_FPN_student.py"))
        for key in ["dataloader", "lr_multiplier"]:
            assert cfg[key] == baseline[key], key
        # the clipping optimizer is a class made anew on each load: compare it by name
        optimizer, base_optimizer = dict(cfg.optimizer), dict(baseline.optimizer)
        assert optimizer.pop("_target_").__name__ == base_optimizer.pop("_target_").__name__
        assert optimizer == base_optimizer
        student = instantiate(baseline.model)
        assert {k: v for k, v in cfg.train.items() if k != "output_dir"} == {
            k: v for k, v in baseline.train.items() if k != "output_dir"
        }
        assert os.path.isfile(os.path.join(ROOT, cfg.model.teacher.config_file))
        cfg.model.teacher.weights, cfg.model.teacher.allow_random = "", True
        cwd = os.getcwd()
        os.chdir(ROOT)
        try:
            model = instantiate(cfg.model)
        finally:
            os.chdir(cwd)
        # the distiller's student is the baseline's model, setting for setting
        assert _settings(model.student) == _settings(student)
    assert type(model).__name__ == "Distiller" and model.weights


FASHION_CONFIGS = os.path.join(CONFIGS, "FashionScenes")
# what a Fashion scenes config may change in its DeepForest detector: the dataset, its 10
# classes, its input sizes and the output folder (and MimicDet's refinement anchors, which
# DeepForest set for crowns that all sit on P3)
FASHION_KEYS = {
    "DATASETS.TRAIN", "DATASETS.TEST", "MODEL.RETINANET.NUM_CLASSES", "MODEL.ROI_HEADS.NUM_CLASSES",
    "INPUT.MIN_SIZE_TRAIN", "INPUT.MIN_SIZE_TEST", "OUTPUT_DIR",
}  # fmt: skip


def _deepforest_and_fashion_yaml(name):
    loaded = []
    for folder in ("DeepForest", "FashionScenes"):
        loaded.append(_flat(get_mimicdet_cfg(os.path.join(CONFIGS, folder, name))))
    return loaded


@pytest.mark.parametrize(
    "name", ["retinanet_MNV2_FPN.yaml", "faster_rcnn_MNV2_FPN.yaml", "mimicdet_MNV2_FPN.yaml"]
)
def test_a_fashion_scenes_config_is_its_deepforest_detector_on_the_scenes(name):
    deepforest, fashion = _deepforest_and_fashion_yaml(name)
    changed = {k for k in fashion if fashion[k] != deepforest[k]}
    allowed = FASHION_KEYS | (
        {"MODEL.MIMICDET.REFINE.ANCHOR_SIZE_PER_STRIDE"} if "mimic" in name else set()
    )
    assert changed <= allowed, sorted(changed - allowed)
    assert fashion["DATASETS.TRAIN"] == ("fashion_scenes_train",)
    assert fashion["DATASETS.TEST"] == ("fashion_scenes_val",)
    assert fashion["MODEL.RETINANET.NUM_CLASSES"] == fashion["MODEL.ROI_HEADS.NUM_CLASSES"] == 10
    assert fashion["INPUT.MIN_SIZE_TEST"] == 512


def test_the_fashion_scenes_fcos_is_the_deepforest_fcos_on_the_scenes():
    deepforest = LazyConfig.load(os.path.join(CONFIGS, "DeepForest", "fcos_MNV2_FPN.py"))
    fashion = LazyConfig.load(os.path.join(FASHION_CONFIGS, "fcos_MNV2_FPN.py"))
    assert fashion.model.num_classes == 10
    assert instantiate(fashion.model).head.cls_score.out_channels == 10
    assert list(fashion.dataloader.train.dataset.names) == ["fashion_scenes_train"]
    assert fashion.dataloader.test.dataset.names == "fashion_scenes_val"
    assert fashion.dataloader.test.mapper.augmentations[0].short_edge_length == 512
    for cfg in (deepforest, fashion):  # the dataset-specific parts set aside
        cfg.model.num_classes = 0
        cfg.dataloader.train.dataset.names = cfg.dataloader.test.dataset.names = ""
        for loader in (cfg.dataloader.train, cfg.dataloader.test):
            loader.mapper.augmentations[0].short_edge_length = 0
        cfg.train.output_dir = ""
        cfg.model.head.norm = cfg.model.head.norm.__name__  # a new function on every load
    assert fashion.model == deepforest.model and fashion.train == deepforest.train
    assert fashion.dataloader == deepforest.dataloader
    assert fashion.lr_multiplier == deepforest.lr_multiplier


def _subnet_layers(subnet):
    """(type, channels, GroupNorm groups) of each layer of a dense head's conv tower."""
    return [
        (type(m).__name__, getattr(m, "out_channels", getattr(m, "num_channels", None)),
         getattr(m, "num_groups", None))
        for m in subnet
    ]  # fmt: skip


@pytest.mark.parametrize("folder", ["DeepForest", "FashionScenes"])
def test_the_benchmarks_retinanet_head_is_fcos_tower_with_its_group_norm(folder):
    """RetinaNet and FCOS differ in anchors, assignment and losses, not in their conv towers:
    without FCOS's GroupNorm, RetinaNet's std-0.01 convs shrink the signal ~4x each on the
    128-channel FPN and its classifier barely learned (docs/benchmark_log.md, 2026-12-05)."""
    cfg = get_mimicdet_cfg(os.path.join(CONFIGS, folder, "retinanet_MNV2_FPN.yaml"))
    cfg.MODEL.DEVICE, cfg.MODEL.MOBILENET.IMAGENET_WEIGHTS = "cpu", ""
    retinanet = build_model(cfg).head
    fcos_cfg = LazyConfig.load(os.path.join(CONFIGS, folder, "fcos_MNV2_FPN.py"))
    fcos_cfg.model.backbone.bottom_up.imagenet_weights = ""
    fcos = instantiate(fcos_cfg.model).head
    for tower in ("cls_subnet", "bbox_subnet"):
        layers = _subnet_layers(getattr(retinanet, tower))
        assert layers == _subnet_layers(getattr(fcos, tower)), tower
        assert ("GroupNorm", 128, 32) in layers


def test_head_signal_shows_the_starved_tower_that_group_norm_fixes():
    """tools/head_signal.py, the measurement behind RetinaNet's GroupNorm: at initialization the
    tower without a norm passes a fraction of its input's spread on to the class logits, the GN
    tower all of it, and a model without a dense tower is refused by name."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from head_signal import tower_signal

    torch.manual_seed(0)
    images = [torch.randint(0, 256, (3, 256, 320), dtype=torch.uint8) for _ in range(2)]
    signal = {}
    for norm in ("", "GN"):
        cfg = get_mimicdet_cfg(
            os.path.join(CONFIGS, "DeepForest", "retinanet_MNV2_FPN.yaml"),
            ["MODEL.RETINANET.NORM", norm, "MODEL.MOBILENET.IMAGENET_WEIGHTS", ""],
        )
        cfg.MODEL.DEVICE = "cpu"
        signal[norm] = tower_signal(build_model(cfg).eval(), images)["p3"]
    (_, plain, plain_logits), (_, normed, normed_logits) = signal[""], signal["GN"]
    assert len(plain) == len(normed) == 4  # one value after each ReLU of the four convs
    assert plain[-1] < 0.1 * plain[0] and normed[-1] > 0.5 * normed[0]
    assert normed_logits > 20 * plain_logits
    with pytest.raises(SystemExit, match="no dense head"):
        tower_signal(nn.Linear(1, 1), images)
