"""
Distributed training on the CPU: 2 processes (gloo) through train_net.main and detectron2's DDP,
and the refinement loss normaliser averaged over workers.
"""

import json
import os
import sys

import pytest
import torch
from detectron2.engine import default_argument_parser

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, ROOT)
import train_net  # noqa: E402

YAML = os.path.join(ROOT, "configs", "COCO-Detection", "mimicdet_R_50_FPN_1x.yaml")

# the paper's ablation rows that change which modules train
ABLATIONS = {
    "default": [],
    "not_staggered": ["MODEL.MIMICDET.STAGGERED", "False"],
    "separate_joint": ["MODEL.MIMICDET.T_HEAD.BACKBONE", "separate_joint"],
    "no_t_head": [
        "MODEL.MIMICDET.T_HEAD.ENABLED",
        "False",
        "MODEL.MIMICDET.MIMIC.ENABLED",
        "False",
    ],
}


def _opts(name, out, tiny_opts):
    return tiny_opts + [
        "DATASETS.TRAIN", f"('{name}',)",
        "DATASETS.TEST", f"('{name}',)",
        "DATALOADER.NUM_WORKERS", "0",
        # the total batch: one image per process
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.BASE_LR", "0.005",
        "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.MAX_ITER", "3",
        "SOLVER.CHECKPOINT_PERIOD", "100",
        "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "64",
        # every detection kept, so an untrained model still has an AP to compare
        "MODEL.MIMICDET.S_HEAD.SCORE_THRESH_TEST", "0.0",
        "TEST.EVAL_PERIOD", "0",
        "SEED", "0",
        "OUTPUT_DIR", out,
    ]  # fmt: skip


def _assert_ranks_equal_final(out):
    final = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)["model"]
    ranks = [torch.load(os.path.join(out, f"rank{r}.pth"), weights_only=True) for r in (0, 1)]
    for key, value in final.items():
        assert torch.equal(ranks[0][key], value), key
        assert torch.equal(ranks[1][key], value), key


@pytest.mark.slow
@pytest.mark.parametrize("ablation", ["not_staggered", "no_t_head", "separate_joint"])
def test_two_process_cpu_training_of_the_ablations(tmp_path, tiny_opts, gloo_script, ablation):
    """The paper's ablation rows train under DDP (no unused parameter, no hang)."""
    run, _, _ = gloo_script(f"mimicdet_tiny_ddp_{ablation}", YAML)
    out = str(tmp_path / "out")
    run(_opts(f"mimicdet_tiny_ddp_{ablation}", out, tiny_opts) + ABLATIONS[ablation], out)
    _assert_ranks_equal_final(out)


@pytest.mark.slow
def test_two_process_cpu_training_and_evaluation(tmp_path, tiny_opts, gloo_script):
    name = "mimicdet_tiny_ddp"
    run, json_file, image_dir = gloo_script(name, YAML)
    out = str(tmp_path / "out")
    opts = _opts(name, out, tiny_opts)

    run(opts, out)
    _assert_ranks_equal_final(out)

    eval_dir = str(tmp_path / "eval2")
    run(["--eval-only"] + opts + ["MODEL.WEIGHTS", os.path.join(out, "model_final.pth")], eval_dir)
    with open(os.path.join(eval_dir, "results.json")) as f:
        two_process = json.load(f)["bbox"]

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    register_coco_instances(name, {}, json_file, image_dir)
    try:
        argv = ["--config-file", YAML, "--eval-only"] + opts
        argv += ["MODEL.WEIGHTS", os.path.join(out, "model_final.pth")]
        argv[argv.index("OUTPUT_DIR") + 1] = str(tmp_path / "eval1")
        one_process = train_net.main(default_argument_parser().parse_args(argv))["bbox"]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert one_process["AP50"] > 0, one_process
    assert set(two_process) == set(one_process)
    for metric, value in one_process.items():
        assert two_process[metric] == pytest.approx(value, abs=1e-6, nan_ok=True), metric


def test_refinement_normaliser_is_the_mean_over_workers(cfg, make_inputs, monkeypatch):
    """Two workers with 10 more positives on the other one: the EMA moves towards the mean."""
    from detectron2.modeling import build_model
    from detectron2.utils import comm
    from detectron2.utils.events import EventStorage

    from mimicdet.modeling import meta_arch

    model = build_model(cfg).train()
    inputs = make_inputs(num_images=1)
    with EventStorage():
        model(inputs)
    features = model.backbone(model.preprocess_image(inputs).tensor)
    anchors = model.refinement.anchors([features[f] for f in model.head_in_features])
    gt_labels = model.refinement.label_anchors(*anchors, [x["instances"] for x in inputs])[0]
    local = (gt_labels == 1).sum().item()
    assert local > 0
    single = 100 * 0.9 + 0.1 * local
    assert model.refine_loss_normalizer == pytest.approx(single)

    def all_reduce(x):  # the other worker has 10 more positives
        x += local + 10

    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(meta_arch.dist, "all_reduce", all_reduce)
    del model.refine_loss_normalizer
    with EventStorage():
        model(inputs)
    assert model.refine_loss_normalizer == pytest.approx(100 * 0.9 + 0.1 * (local + 5))


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_every_trainable_parameter_gets_a_gradient(cfg, make_inputs, ablation):
    """DDP runs without find_unused_parameters: a parameter without a gradient would hang it."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    cfg.merge_from_list(ABLATIONS[ablation])
    model = build_model(cfg).train()
    ran = []
    for name in ["fpn_lateral2", "fpn_output2"]:
        getattr(model.backbone, name).register_forward_hook(lambda *_, n=name: ran.append(n))
    with EventStorage():
        losses = model(make_inputs(num_images=2))
    sum(losses.values()).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused
    # P2 is computed only for the staggered T-head, the one module that reads it
    assert bool(ran) == (ablation == "default")
