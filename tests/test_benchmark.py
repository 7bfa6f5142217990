"""tools/benchmark.py: the tuning order, what a run records, and the report built from results."""

import dataclasses
import hashlib
import itertools
import json
import shlex
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import benchmark  # noqa: E402
import benchmark_report  # noqa: E402
from benchmark_rows import DATASETS, LEARNING_RATES, ROWS, anchor_sizes  # noqa: E402


def fake_result(results, dataset, row, variant, seed, ap, curve=None, max_iter=1200):
    """A committed run result as benchmark.Benchmark.run writes it."""
    path = benchmark.result_path(results, dataset, row, variant, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    final = {
        k: (None if ap is None else ap * (1 + i / 10)) for i, k in enumerate(benchmark.FINAL_KEYS)
    }
    result = {
        "dataset": dataset, "row": row, "variant": variant, "seed": seed, "final": final,
        "curve": curve or [[600, ap and ap / 2, None], [1200, ap, None]], "loss_curve": [],
        "train_s_per_iter": 1.0 + seed, "infer_ms": 100.0, "params": 5e6, "gflops": 4.0,
        "yardstick_ms": 50.0, "train_cpu_share": 0.95, "machine": "a CPU, 2 threads, CPU",
        "max_iter": max_iter, "learned": ap is not None and ap >= benchmark.LEARNED_MIN_AP,
    }  # fmt: skip
    path.write_text(json.dumps(result))
    return result


def test_read_metrics_keeps_the_curve_the_final_evaluation_and_the_step_time(
    tmp_path, monkeypatch
):
    metrics = tmp_path / "metrics.json"
    records = [
        {"iteration": 19, "time": 9.0, "total_loss": 3.0, "loss_cls": 2.0, "s/num_fg": 9.0},
        {"iteration": 59, "time": 2.0, "total_loss": 2.0, "loss_cls": 1.5, "s/num_fg": 7.0},
        {"iteration": 99, "bbox/AP": 10.0, "bbox/AP50": 30.0},
        {"iteration": 99, "time": 4.0, "total_loss": 1.0, "loss_cls": 0.5, "s/num_fg": 5.0},
        {"iteration": 199, "time": 3.0},
        # the evaluation after training: logged at iteration max_iter, one past the last step
        {"iteration": 200, "bbox/AP": 12.0, "bbox/AP50": 33.0, "bbox/AP75": 8.0, "bbox/APs": 1.0},
    ]
    metrics.write_text("\n".join(json.dumps(r) for r in records))
    got = benchmark.read_metrics(metrics, warmup_iters=50, max_iter=200)
    assert got["curve"] == [[100, 10.0, 30.0], [200, 12.0, 33.0]]
    assert (
        got["final"]["AP"] == 12.0 and got["final"]["AP75"] == 8.0 and got["final"]["APl"] is None
    )
    assert got["train_s_per_iter"] == 3.0  # the 9 s warm-up step is left out
    assert got["loss_curve"] == [[20, 3.0], [60, 2.0], [100, 1.0]]
    # each loss term and sample count over the last training records (not time, lr or AP)
    monkeypatch.setattr(benchmark, "END_OF_TRAINING_RECORDS", 2)
    got = benchmark.read_metrics(metrics, warmup_iters=50, max_iter=200)
    assert got["end_of_training"] == {"loss_cls": 1.0, "s/num_fg": 6.0}


def test_every_row_gets_the_same_schedule_scaled_from_its_config():
    deepforest = DATASETS["deepforest"]
    yaml_opts = benchmark.schedule_opts("deepforest", ROWS["retinanet"], 1200, 100, "cpu")
    pairs = dict(zip(yaml_opts[::2], yaml_opts[1::2]))
    # Base-DeepForest-MNV2.yaml: 200 iterations, steps (150, 185), 50 warm-up
    assert pairs["SOLVER.MAX_ITER"] == "1200" and pairs["SOLVER.STEPS"] == "(900, 1110)"
    assert pairs["SOLVER.WARMUP_ITERS"] == "300" and pairs["TEST.EVAL_PERIOD"] == "100"
    lazy = benchmark.schedule_opts("deepforest", ROWS["fcos"], 1200, 100, "cuda")
    assert "train.max_iter=1200" in lazy and "train.device=cuda" in lazy
    assert deepforest.configs == "configs/DeepForest"
    for row in ROWS.values():  # every row's config exists for both datasets
        for dataset in DATASETS.values():
            assert (REPO / dataset.configs / row.config).is_file(), (dataset.name, row.name)


def test_the_sweep_tries_every_learning_rate_then_the_key_at_the_best(tmp_path):
    bench = benchmark.Benchmark(tmp_path, tmp_path / "out")
    first = bench.sweep("deepforest", "retinanet")
    assert [v.name for v in first] == [f"lr{lr:g}" for lr in LEARNING_RATES]
    assert bench.chosen("deepforest", "retinanet") is None
    for lr, ap in zip(LEARNING_RATES, (3.0, 9.0, None)):  # the highest rate found nothing
        fake_result(tmp_path, "deepforest", "retinanet", f"lr{lr:g}", 0, ap)
    runs = {v.name: v for v in bench.sweep("deepforest", "retinanet")}
    assert set(runs) == {"lr0.0025", "lr0.005", "lr0.01", "lr0.005-anchor16"}
    key_opts = runs["lr0.005-anchor16"].opts
    assert key_opts[:2] == ("SOLVER.BASE_LR", "0.005")
    assert key_opts[2:] == ("MODEL.ANCHOR_GENERATOR.SIZES", anchor_sizes(16.0))
    assert runs["lr0.005"].key_value == 32.0 and runs["lr0.005-anchor16"].key_value == 16.0
    assert bench.chosen("deepforest", "retinanet") is None  # the key's run is missing
    fake_result(tmp_path, "deepforest", "retinanet", "lr0.005-anchor16", 0, 11.0)
    assert bench.chosen("deepforest", "retinanet").name == "lr0.005-anchor16"
    # a distilled student is its parent's choice with one change, not tuned again
    assert bench.chosen("deepforest", "retinanet_fgfi").name == "lr0.005-anchor16"
    # seed 0 chose the variant on val: the reported seeds start at 1
    assert bench.seeds("retinanet_fgfi") == [1] and bench.seeds("mimicdet") == [1, 2]
    # a result of another schedule does not count as done
    fake_result(tmp_path, "deepforest", "retinanet", "lr0.005-anchor16", 0, 11.0, max_iter=2)
    assert bench.chosen("deepforest", "retinanet") is None

    # the LazyConfig FCOS: both the optimizer's and every group's rate, its own key
    for lr, ap in zip(LEARNING_RATES, (5.0, 4.0, 1.0)):
        fake_result(tmp_path, "deepforest", "fcos", f"lr{lr:g}", 0, ap)
    runs = {v.name: v.opts for v in bench.sweep("deepforest", "fcos")}
    assert runs["lr0.0025-radius2.5"] == (
        "optimizer.lr=0.0025", "optimizer.params.base_lr=0.0025",
        "model.center_sampling_radius=2.5",
    )  # fmt: skip


def test_rm_pfi_gets_a_teacher_with_the_students_anchors(tmp_path):
    bench = benchmark.Benchmark(tmp_path, tmp_path / "out")
    for row, aps in (("retinanet", (3.0, 9.0, 1.0, 11.0)), ("faster_rcnn", (8.0, 12.0, 2.0, 10.0))):
        for seed in (0, 1):
            for variant, ap in zip(("lr0.0025", "lr0.005", "lr0.01", "lr0.005-anchor16"), aps):
                fake_result(tmp_path, "deepforest", row, variant, seed, ap)
                out = bench.run_dir("deepforest", row, variant, seed)
                out.mkdir(parents=True)
                (out / "model_final.pth").touch()
                (out / "metrics.json").write_text(
                    json.dumps({"iteration": 1200, "bbox/AP": ap + seed}) + "\n"
                )
    student = bench.chosen("deepforest", "retinanet")
    assert student.name == "lr0.005-anchor16"
    # FGFI and DeFeat: the chosen Faster R-CNN (32 px anchors); RM+PFI: its 16 px variant
    fgfi, fgfi_teacher = bench.teacher("deepforest", ROWS["retinanet_fgfi"], student, 1)
    rm, rm_teacher = bench.teacher("deepforest", ROWS["retinanet_rm_pfi"], student, 1)
    fgfi, rm = (dict(zip(o[::2], o[1::2])) for o in (fgfi, rm))
    assert fgfi["MODEL.DISTILL.TEACHER.WEIGHTS"].endswith(
        "faster_rcnn/lr0.005-seed1/model_final.pth"
    )
    assert rm["MODEL.DISTILL.TEACHER.WEIGHTS"].endswith(
        "faster_rcnn/lr0.005-anchor16-seed1/model_final.pth"
    )
    assert anchor_sizes(16.0) in rm["MODEL.DISTILL.TEACHER.OPTS"]
    assert "anchor" not in fgfi["MODEL.DISTILL.TEACHER.OPTS"].lower()
    assert rm["MODEL.DISTILL.TEACHER.CONFIG_FILE"] == "configs/DeepForest/faster_rcnn_MNV2_FPN.yaml"
    # the student's result records which teacher taught it, and how good it was
    teacher_weights = bench.run_dir("deepforest", "faster_rcnn", "lr0.005", 1) / "model_final.pth"
    assert fgfi_teacher == {
        "row": "faster_rcnn", "variant": "lr0.005", "seed": 1, "AP": 13.0,
        "sha256": benchmark.sha256(teacher_weights),
    }  # fmt: skip
    assert rm_teacher["variant"] == "lr0.005-anchor16" and rm_teacher["AP"] == 11.0
    # a multi-class teacher's second stage scores RM's candidates: RM+PFI runs on Fashion too
    assert bench.missing("fashion_scenes", ["retinanet_rm_pfi"])[-1] == (
        "retinanet_rm_pfi",
        "the chosen variant",
        1,
    )


# each KD term a student row trains with, by the weight key of the row's options that turns it on
KD_TERMS_BY_WEIGHT = {
    "MODEL.DISTILL.FGFI.WEIGHT": "loss_kd_fgfi",
    "MODEL.DISTILL.DEFEAT.FG_WEIGHT": "loss_kd_defeat_fg",
    "MODEL.DISTILL.DEFEAT.BG_WEIGHT": "loss_kd_defeat_bg",
    "MODEL.DISTILL.RANK.WEIGHT": "loss_kd_rank",
    "MODEL.DISTILL.PFI.WEIGHT": "loss_kd_pfi",
}


def ten_class_scenes(size=256):
    """Two scenes with objects of all ten classes, 12 to 200 px: from P3's anchors to P7's."""
    from detectron2.structures import Boxes, Instances

    boxes = [(8, 8, 20, 20), (30, 20, 62, 44), (70, 10, 134, 74), (20, 90, 220, 250),
             (150, 100, 190, 150), (200, 12, 240, 60), (100, 170, 150, 240)]  # fmt: skip
    inputs = []
    for image_index in range(2):
        scene = Instances((size, size))
        scene.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        # the first scene has classes 0..6, the second 3..9
        scene.gt_classes = torch.arange(len(boxes)) + 3 * image_index
        image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8).float()
        inputs.append({"image": image, "instances": scene, "height": size, "width": size})
    return inputs


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, r in ROWS.items() if r.teacher is not None])
def test_every_fashion_student_trains_on_ten_classes_with_its_kd_terms(tmp_path, name):
    """A Fashion student row as the benchmark configures it (its dataset's 10-class configs, the
    row's options, a Fashion Faster R-CNN teacher's checkpoint): it builds, and one training
    step on objects of every class and level gives the detector's losses and every KD term the
    row weights, finite and positive, whose gradients reach the student's pyramid."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from mimicdet import get_mimicdet_cfg

    row = ROWS[name]
    teacher_config = REPO / benchmark.config_path("fashion_scenes", ROWS[row.teacher])
    teacher_cfg = get_mimicdet_cfg(teacher_config, ["MODEL.DEVICE", "cpu"])
    assert teacher_cfg.MODEL.ROI_HEADS.NUM_CLASSES == 10
    torch.manual_seed(1)
    weights = tmp_path / "teacher.pth"
    torch.save({"model": build_model(teacher_cfg).state_dict()}, weights)
    # the teacher variant's own options: none at the configs' anchors, as the students' are
    variant = benchmark.Variant("lr0.01", (), 0.01, None)
    opts = [*row.opts, *benchmark.teacher_opts(teacher_config, weights, variant)]
    cfg = get_mimicdet_cfg(REPO / benchmark.config_path("fashion_scenes", row), opts)
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert type(model).__name__ == "Distiller" and model.student.num_classes == 10
    options = dict(zip(row.opts[::2], row.opts[1::2]))
    expected = {term for key, term in KD_TERMS_BY_WEIGHT.items() if float(options.get(key, 0))}
    assert expected, f"{name} weights no KD term"
    with EventStorage(0):
        losses = model(ten_class_scenes())
    assert set(losses) == {"loss_cls", "loss_box_reg"} | expected
    assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
    sum(losses[term] for term in expected).backward()
    assert model.student.backbone.fpn_output3.weight.grad.abs().sum() > 0


def test_the_plan_lists_what_is_left_in_training_order_with_its_time(tmp_path, capsys):
    bench = benchmark.Benchmark(tmp_path, tmp_path / "out")
    rows = ["retinanet_rm_pfi"]
    # nothing has run: RetinaNet's sweep (its key still unknown), then Faster R-CNN's
    first = bench.missing("deepforest", rows, sweep_only=True)
    assert first[:4] == [
        ("retinanet", "lr0.0025", 0), ("retinanet", "lr0.005", 0), ("retinanet", "lr0.01", 0),
        ("retinanet", "anchor=16 at the best lr", 0),
    ]  # fmt: skip
    assert len(first) == 4  # --sweep-only: the student's own detector only
    full = bench.missing("deepforest", rows)
    assert full[-2:] == [
        ("faster_rcnn", "the chosen variant", 1),
        ("retinanet_rm_pfi", "the chosen variant", 1),
    ]
    for row, aps in (("retinanet", (3.0, 9.0, 1.0, 11.0)), ("faster_rcnn", (8.0, 12.0, 2.0, 10.0))):
        for variant, ap in zip(("lr0.0025", "lr0.005", "lr0.01", "lr0.005-anchor16"), aps):
            fake_result(tmp_path, "deepforest", row, variant, 0, ap)
    # both sweeps done: RM+PFI's teacher is the Faster R-CNN with the student's 16 px anchors
    assert bench.missing("deepforest", rows) == [
        ("faster_rcnn", "lr0.005-anchor16", 1),
        ("retinanet_rm_pfi", "lr0.005-anchor16", 1),
    ]
    # a teacher whose result is committed but whose checkpoint is not here is trained again
    fake_result(tmp_path, "deepforest", "faster_rcnn", "lr0.005-anchor16", 1, 10.5)
    assert bench.missing("deepforest", rows)[0] == (
        "faster_rcnn",
        "lr0.005-anchor16 again (no checkpoint here)",
        1,
    )
    out = bench.run_dir("deepforest", "faster_rcnn", "lr0.005-anchor16", 1)
    out.mkdir(parents=True)
    (out / "model_final.pth").touch()
    assert bench.missing("deepforest", rows) == [("retinanet_rm_pfi", "lr0.005-anchor16", 1)]
    # a student whose result is committed needs no teacher, whether or not the teacher's
    # checkpoint is here
    fake_result(tmp_path, "deepforest", "retinanet_rm_pfi", "lr0.005-anchor16", 1, 12.0)
    (out / "model_final.pth").unlink()
    assert bench.missing("deepforest", rows) == []
    (out / "model_final.pth").touch()
    (tmp_path / "runs/deepforest/retinanet_rm_pfi/lr0.005-anchor16-seed1.json").unlink()
    # its time: RetinaNet's committed s/iter (fake_result: 1.0 at seed 0) x 1200 steps, a lower
    # bound for a student that also runs its teacher
    capsys.readouterr()
    bench.print_plan("deepforest", rows)
    printed = capsys.readouterr().out
    assert "~20 min (from retinanet's s/iter)" in printed and "1 run to train" in printed
    # a dataset where nothing has run yet borrows the other dataset's steps, saying so
    capsys.readouterr()
    bench.print_plan("fashion_scenes", ["retinanet"], sweep_only=True)
    printed = capsys.readouterr().out
    minutes = round(DATASETS["fashion_scenes"].max_iter / 60)
    assert f"~{minutes} min (from deepforest retinanet's s/iter)" in printed


def test_the_plan_counts_the_steps_an_interrupted_run_has_left(tmp_path, capsys):
    """A run folder with a checkpoint of the command the run would train with now resumes after
    it, and the plan counts only the steps left; a checkpoint of another command, or a student's
    whose teacher would be trained again first, trains from scratch and counts whole."""
    bench = benchmark.Benchmark(tmp_path, tmp_path / "out")
    for row, aps in (("retinanet", (3.0, 9.0, 1.0, 11.0)), ("faster_rcnn", (8.0, 12.0, 2.0, 10.0))):
        for variant, ap in zip(("lr0.0025", "lr0.005", "lr0.01", "lr0.005-anchor16"), aps):
            fake_result(tmp_path, "deepforest", row, variant, 0, ap)
    student, teacher = ROWS["retinanet_fgfi"], ROWS["faster_rcnn"]
    s_variant = bench.chosen("deepforest", "retinanet_fgfi")
    t_variant = bench.chosen("deepforest", "faster_rcnn")
    t_out = bench.run_dir("deepforest", "faster_rcnn", t_variant.name, 1)
    t_weights = t_out / "model_final.pth"
    t_out.mkdir(parents=True)
    t_weights.write_bytes(b"teacher")
    t_result = fake_result(tmp_path, "deepforest", "faster_rcnn", t_variant.name, 1, 12.0)
    t_result["sha256"] = {"model_final.pth": benchmark.sha256(t_weights)}  # the committed run's
    benchmark.write_result(
        benchmark.result_path(tmp_path, "deepforest", "faster_rcnn", t_variant.name, 1), t_result
    )
    out = bench.run_dir("deepforest", "retinanet_fgfi", s_variant.name, 1)
    out.mkdir(parents=True)

    def interrupted(variant, digest, checkpoint="model_0000299.pth"):
        t_opts = benchmark.teacher_opts(
            benchmark.config_path("deepforest", teacher), t_weights, t_variant
        )
        arguments = bench.train_arguments(
            "deepforest", student, variant, 1, out, t_opts, digest
        )[2]
        benchmark.write_result(out / benchmark.RUN_COMMAND_FILE, arguments)
        (out / "last_checkpoint").write_text(checkpoint)

    def steps_done():
        return bench.steps_done("deepforest", "retinanet_fgfi", s_variant.name, 1)

    def planned():
        capsys.readouterr()
        bench.print_plan("deepforest", ["retinanet_fgfi"])
        return [line for line in capsys.readouterr().out.splitlines() if "fgfi " in line]

    assert planned() == [  # retinanet's s/iter (1.0) x 1200 steps
        f"  retinanet_fgfi         {s_variant.name:34} seed 1  ~20 min (from retinanet's s/iter)"
    ]
    interrupted(s_variant, benchmark.sha256(t_weights))
    assert steps_done() == 300
    assert planned()[0].endswith("~15 min (from retinanet's s/iter; resumes after step 300)")
    # a student also runs its teacher: the steps it has done time the rest better than its
    # root detector's committed ones
    records = [{"iteration": i, "time": 3.0, "total_loss": 1.0} for i in range(19, 300, 20)]
    (out / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert planned()[0].endswith("~45 min (at its own s/iter so far; resumes after step 300)")
    # stopped in its final evaluation: every step done
    interrupted(s_variant, benchmark.sha256(t_weights), "model_final.pth")
    assert steps_done() == 1200
    # started at another learning rate: trained anew
    other = dataclasses.replace(s_variant, opts=("SOLVER.BASE_LR", "0.02"))
    interrupted(other, benchmark.sha256(t_weights))
    assert steps_done() == 0
    # taught by weights that are not the committed teacher's, of a teacher training that did not
    # finish under its current command: the teacher trains again first, and the student anew
    t_weights.write_bytes(b"a teacher trained again")
    interrupted(s_variant, benchmark.sha256(t_weights))
    assert steps_done() == 0
    # ... but a teacher training finished under its current command teaches as it is
    t_arguments = bench.train_arguments("deepforest", teacher, t_variant, 1, t_out)[2]
    benchmark.write_result(t_out / benchmark.RUN_COMMAND_FILE, t_arguments)
    (t_out / "metrics.json").write_text(json.dumps({"iteration": 1200, "bbox/AP": 9.0}) + "\n")
    assert steps_done() == 300
    t_weights.unlink()  # no teacher here: it trains again, and the student after it
    assert steps_done() == 0
    # the teacher's own interrupted training again counts only the steps it has left
    (t_out / "last_checkpoint").write_text("model_0000599.pth")
    capsys.readouterr()
    bench.print_plan("deepforest", ["retinanet_fgfi"])
    again = [line for line in capsys.readouterr().out.splitlines() if "again" in line]
    assert len(again) == 1 and again[0].endswith("~10 min (resumes after step 600)")


def test_the_report_averages_the_reported_seeds_that_learned_and_names_the_others(tmp_path):
    for lr, ap in zip(LEARNING_RATES, (6.0, 8.0, 7.0)):
        fake_result(tmp_path, "deepforest", "fcos", f"lr{lr:g}", 0, ap)
    fake_result(tmp_path, "deepforest", "fcos", "lr0.005-radius2.5", 0, 7.5)
    summary = benchmark_report.write_report(tmp_path, "today")
    row = summary["datasets"]["deepforest"]["rows"]["fcos"]
    assert row["tuning_run_only"] and row["AP"] == 8.0  # until a reported seed exists
    assert "8.0 (tuning run only)" in (tmp_path / "deepforest.md").read_text()

    fake_result(tmp_path, "deepforest", "fcos", "lr0.005", 1, 0.0)  # a seed that did not learn
    fake_result(tmp_path, "deepforest", "fcos", "lr0.005", 2, 10.0)
    summary = benchmark_report.write_report(tmp_path, "today")
    row = summary["datasets"]["deepforest"]["rows"]["fcos"]
    assert row["variant"] == "lr0.005" and row["sweep_complete"]
    # seed 0 (8.0) chose the variant and is left out; seed 1 did not learn
    assert row["AP"] == pytest.approx(10.0) and row["did_not_learn"] == [1]
    assert row["AP_per_seed"] == [0.0, 10.0]
    table = (tmp_path / "deepforest.md").read_text()
    assert "| FCOS | 10.0 |" in table and "(seed 1 did not learn)" in table
    assert "lr0.0025: 6.0" in table and "lr0.005-radius2.5: 7.5" in table
    for plot in ("ap_curves", "speed_accuracy", "tuning_curves"):
        plot = f"deepforest_{plot}.png"
        assert (tmp_path / plot).stat().st_size > 10_000
    assert json.loads((tmp_path / "results.json").read_text())["datasets"]["deepforest"]

    # the README's table, between its markers, follows the results; the rest stays
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n<!-- benchmark-table -->\nold\n<!-- /benchmark-table -->\nrest\n")
    benchmark_report.write_report(tmp_path, "today", readme=readme)
    text = readme.read_text()
    assert text.startswith("# Title\n<!-- benchmark-table -->\n") and text.endswith("rest\n")
    # one line per detector, AP (AP50) per dataset and the deploy model's ms
    assert "old" not in text and "| FCOS | 10.0 (11.0) | 100 |" in text and "today" in text
    assert "benchmarks/deepforest_ap_curves.png" in text


def test_mimicdets_two_heads_are_compared_over_the_seeds_whose_t_head_was_scored(tmp_path):
    """The teacher/student table: the T-head's metrics beside the S-head's of the same runs;
    a run from before T-heads were scored counts in the main table, not in this one."""
    fake_result(tmp_path, "fashion_scenes", "mimicdet", "lr0.005", 0, 40.0, max_iter=3600)
    summary = benchmark_report.write_report(tmp_path, "today")
    assert summary["datasets"]["fashion_scenes"]["rows"]["mimicdet"]["heads"] is None
    assert "MimicDet's two heads" not in (tmp_path / "fashion_scenes.md").read_text()

    for seed, s_ap, t_ap in ((1, 48.0, 55.0), (2, 50.0, None)):
        result = fake_result(tmp_path, "fashion_scenes", "mimicdet", "lr0.005", seed, s_ap,
                             max_iter=3600)  # fmt: skip
        if t_ap is not None:
            result["t_head_final"] = {k: t_ap + i for i, k in enumerate(benchmark.FINAL_KEYS)}
            path = benchmark.result_path(tmp_path, "fashion_scenes", "mimicdet", "lr0.005", seed)
            path.write_text(json.dumps(result))
    row = benchmark_report.write_report(tmp_path, "today")["datasets"]["fashion_scenes"]["rows"]
    heads = row["mimicdet"]["heads"]
    assert row["mimicdet"]["AP"] == pytest.approx(49.0)  # both seeds
    assert heads["seeds"] == [1]  # seed 2's T-head was not scored
    assert heads["s_head"]["AP"] == 48.0 and heads["t_head"]["AP"] == 55.0
    table = (tmp_path / "fashion_scenes.md").read_text()
    # the gap is the teacher's AP less the student's; sizes are AP_s / AP_m / AP_l
    # no run was scored with the heads mixed (before 2026-12-05): those columns say so
    assert "| MimicDet | 1 | 48.0 | 55.0 | +7.0 | – | – |" in table
    assert "| 62.4 / 67.2 / 72.0 | 58.0 / 59.0 / 60.0 |" in table


def test_the_mixed_heads_gain_is_over_the_s_head_of_the_runs_scored_so(tmp_path):
    """Each head's classes on the other's boxes, beside the S-head's AP of the same runs, with
    the seeds named when some of the row's T-head runs were not scored so."""
    fake_result(tmp_path, "fashion_scenes", "mimicdet", "lr0.005", 0, 40.0, max_iter=3600)
    for seed, s_ap, mixed in ((1, 48.0, (52.0, 49.5)), (2, 50.0, None)):
        result = fake_result(tmp_path, "fashion_scenes", "mimicdet", "lr0.005", seed, s_ap,
                             max_iter=3600)  # fmt: skip
        result["t_head_final"] = {k: 55.0 for k in benchmark.FINAL_KEYS}
        if mixed:
            result["mixed_heads_final"] = {
                name: {"AP": ap} for name, ap in zip(benchmark_report.MIXED_HEADS, mixed)
            }
        path = benchmark.result_path(tmp_path, "fashion_scenes", "mimicdet", "lr0.005", seed)
        path.write_text(json.dumps(result))
    row = benchmark_report.write_report(tmp_path, "today")["datasets"]["fashion_scenes"]["rows"]
    assert row["mimicdet"]["heads"]["mixed"] == {
        "seeds": [1], "s_head_AP": 48.0, "t_classes_s_boxes": 52.0, "s_classes_t_boxes": 49.5
    }  # fmt: skip
    # T classes on S boxes gains 4.0 over seed 1's S-head (48.0), not over the row's 49.0
    line = "| MimicDet | 1, 2 | 49.0 | 55.0 | +6.0 | 52.0 (+4.0, seed 1) | 49.5 (+1.5, seed 1) |"
    assert line in (tmp_path / "fashion_scenes.md").read_text()


def test_a_mimicdet_runs_t_head_is_scored_on_its_final_checkpoint_with_its_options(
    tmp_path, monkeypatch
):
    commands = []

    def evaluate_teacher(command, **kwargs):
        commands.append(command)
        output = Path(command[command.index("--output") + 1])
        scored = {"s_head": {"AP": 40.0}, "t_head": {"AP": 45.0}}
        if "--mixed" in command:
            scored.update(t_classes_s_boxes={"AP": 43.0}, s_classes_t_boxes={"AP": 41.0})
        output.write_text(json.dumps(scored))

    monkeypatch.setattr(benchmark.subprocess, "run", evaluate_teacher)
    bench = benchmark.Benchmark(tmp_path / "results", tmp_path / "out")
    out = tmp_path / "out" / "run"
    out.mkdir(parents=True)
    opts = ["MODEL.MIMICDET.STAGGERED", "False", "SOLVER.BASE_LR", "0.005"]
    row = ROWS["mimicdet_same_level"]
    assert bench.evaluate_t_head("fashion_scenes", row, opts, out) == {
        "t_head_final": {"AP": 45.0},
        "mixed_heads_final": {"t_classes_s_boxes": {"AP": 43.0}, "s_classes_t_boxes": {"AP": 41.0}},
    }
    (command,) = commands
    assert command[1] == "tools/evaluate_teacher.py"
    assert command[command.index("--config-file") + 1] == benchmark.config_path(
        "fashion_scenes", row
    )
    # the run's own options (its ablation switch included), then its final checkpoint
    assert command[-len(opts) - 2 :] == opts + ["MODEL.WEIGHTS", str(out / "model_final.pth")]
    # a detector without a T-head is not evaluated again
    assert bench.evaluate_t_head("fashion_scenes", ROWS["faster_rcnn"], opts, out) == {
        "t_head_final": None,
        "mixed_heads_final": None,
    }
    assert len(commands) == 1


def test_packed_runs_unpack_into_results_and_never_replace_another(tmp_path, capsys):
    """A GPU machine's runs come back in one --pack file; --unpack adds them here."""
    gpu = tmp_path / "gpu"
    fake_result(gpu, "deepforest", "mimicdet", "lr0.005", 0, 9.0)
    fake_result(gpu, "deepforest", "mimicdet", "lr0.01", 0, 8.0)
    benchmark.main(["--report", "--results", str(gpu), "--pack", str(tmp_path / "runs.json")])

    here = tmp_path / "here"
    kept = fake_result(here, "deepforest", "mimicdet", "lr0.005", 0, 9.0)  # the same run
    benchmark.main(["--unpack", str(tmp_path / "runs.json"), "--results", str(here)])
    unpacked = benchmark.load_result(here, "deepforest", "mimicdet", "lr0.01", 0)
    assert unpacked["final"]["AP"] == 8.0
    assert benchmark.load_result(here, "deepforest", "mimicdet", "lr0.005", 0) == kept
    assert "unpacked 1 new run results" in capsys.readouterr().out
    assert "MimicDet" in (here / "deepforest.md").read_text()  # the tables follow

    # a different result of the same run stays, and nothing of the file is written
    other = tmp_path / "other"
    fake_result(other, "deepforest", "mimicdet", "lr0.01", 0, 3.0)
    with pytest.raises(SystemExit, match="lr0.01-seed0.json exists with another result"):
        benchmark.unpack_runs(tmp_path / "runs.json", other)
    assert benchmark.load_result(other, "deepforest", "mimicdet", "lr0.005", 0) is None
    assert benchmark.load_result(other, "deepforest", "mimicdet", "lr0.01", 0)["final"]["AP"] == 3
    # into the committed results, only the benchmark's schedule (not a smoke run's)
    smoke = tmp_path / "smoke"
    fake_result(smoke, "deepforest", "mimicdet", "lr0.005", 0, 1.0, max_iter=3)
    benchmark.pack_runs(smoke, tmp_path / "smoke.json")
    with pytest.raises(SystemExit, match="ran 3 iterations, not the benchmark's 1200"):
        benchmark.unpack_runs(tmp_path / "smoke.json", other)
    assert benchmark.unpack_runs(tmp_path / "smoke.json", other, benchmark_schedule=False)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="bad.json: not a file of --pack"):
        benchmark.unpack_runs(tmp_path / "bad.json", other)


def test_model_zoo_lists_each_reported_model_with_its_checkpoint_digests(tmp_path):
    fake_result(tmp_path, "deepforest", "fcos", "lr0.005", 0, 8.0)  # tuning: not a zoo model
    result = fake_result(tmp_path, "deepforest", "fcos", "lr0.005", 1, 9.0)
    result.update(
        config="configs/DeepForest/fcos_MNV2_FPN.py", sha256={"model_final.pth": "ab" * 32}
    )
    benchmark.result_path(tmp_path, "deepforest", "fcos", "lr0.005", 1).write_text(
        json.dumps(result)
    )
    zoo = tmp_path / "MODEL_ZOO.md"
    zoo.write_text("# Zoo\ndemo\n<!-- benchmark-models -->\nold\n<!-- /benchmark-models -->\n")
    benchmark_report.write_report(tmp_path, "today", model_zoo=zoo)
    text = zoo.read_text()
    assert text.startswith("# Zoo\ndemo\n") and "old" not in text
    assert "| FCOS | deepforest | `configs/DeepForest/fcos_MNV2_FPN.py` | lr0.005 | 1 |" in text
    # where the run's command writes the checkpoint, for `sha256sum -c` from the repository
    assert f"{'ab' * 32}  output/benchmark/deepforest/fcos/lr0.005-seed1/model_final.pth" in text
    assert "| 0 |" not in text  # a reported seed exists: the tuning run is left out
    # a row with its tuning run only shows that run, the chosen variant's (not the others')
    for variant, ap in (("lr0.005", 5.0), ("lr0.01", 7.0)):
        tuning = fake_result(tmp_path, "deepforest", "retinanet", variant, 0, ap)
        tuning.update(config="configs/DeepForest/retinanet_MNV2_FPN.yaml", sha256={"m.pth": "cd"})
        path = benchmark.result_path(tmp_path, "deepforest", "retinanet", variant, 0)
        path.write_text(json.dumps(tuning))
    benchmark_report.write_report(tmp_path, "today", model_zoo=zoo)
    text = zoo.read_text()
    assert (
        "| RetinaNet | deepforest | `configs/DeepForest/retinanet_MNV2_FPN.yaml` | lr0.01 | 0 |"
        in text
    )
    assert "lr0.005-seed0" not in text
    zoo.write_text("# no markers\n")  # fmt: skip
    with pytest.raises(ValueError, match="MODEL_ZOO.md has no <!-- benchmark-models -->"):
        benchmark_report.write_report(tmp_path, "today", model_zoo=zoo)


def test_a_report_and_a_pack_of_no_run_at_all_are_empty_not_an_error(tmp_path):
    """gpu_check packs whatever finished in its time box, possibly nothing."""
    empty = tmp_path / "never_created"
    assert benchmark_report.write_report(empty, "today")["datasets"] == {}
    assert benchmark.pack_runs(empty, tmp_path / "runs.json") == {}


def test_the_report_is_dated_by_its_newest_run_so_writing_it_again_changes_no_file(tmp_path):
    """The lanes write the report after every stage, also one whose runs were all done: the
    README and MODEL_ZOO.md must then stay as committed, dated like the tables they show."""
    for dataset, date in (("deepforest", "2026-12-01 10:00 UTC"), ("fashion_scenes", None)):
        steps = DATASETS[dataset].max_iter
        result = fake_result(tmp_path, dataset, "retinanet", "lr0.005", 1, 8.0, max_iter=steps)
        result["date"] = date or "2026-12-03 09:30 UTC"
        benchmark.result_path(tmp_path, dataset, "retinanet", "lr0.005", 1).write_text(
            json.dumps(result)
        )
    readme, zoo = tmp_path / "README.md", tmp_path / "MODEL_ZOO.md"
    readme.write_text("<!-- benchmark-table -->\n<!-- /benchmark-table -->\n")
    zoo.write_text(f"{benchmark_report.ZOO_START}\n{benchmark_report.ZOO_END}\n")
    outputs = (readme, zoo, tmp_path / "results.json", tmp_path / "fashion_scenes.md")

    summary = benchmark_report.write_report(tmp_path, readme=readme, model_zoo=zoo)
    assert summary["date"] == "2026-12-03 09:30 UTC"  # the newest run of either dataset
    assert all("2026-12-03 09:30 UTC" in path.read_text() for path in outputs)
    assert "2026-12-01 10:00 UTC" in (tmp_path / "deepforest.md").read_text()
    first = [path.read_bytes() for path in outputs]
    benchmark_report.write_report(tmp_path, readme=readme, model_zoo=zoo)
    assert [path.read_bytes() for path in outputs] == first


def test_a_runs_code_version_is_dirty_for_code_changes_not_for_the_benchmarks_outputs(
    tmp_path, monkeypatch
):
    import subprocess

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    for path in ("tools/benchmark.py", "benchmarks/results.json", "README.md"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("0\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    monkeypatch.setattr(benchmark, "REPO", tmp_path)
    clean = benchmark.code_version()
    assert clean and not clean.endswith("+dirty")
    # the report rewrites these after every run, while the next run starts
    (tmp_path / "benchmarks/results.json").write_text("1\n")
    (tmp_path / "README.md").write_text("1\n")
    assert benchmark.code_version() == clean
    (tmp_path / "tools/benchmark.py").write_text("1\n")
    assert benchmark.code_version() == clean + "+dirty"


def test_a_changed_schedule_is_refused_into_the_benchmarks_own_folders(tmp_path, capsys):
    """A probe's runs would replace the committed results, or empty the training folders that
    hold the benchmark's checkpoints (its teachers among them)."""
    results, output = ["--results", str(tmp_path / "r")], ["--output", str(tmp_path / "o")]
    for flag in (["--smoke"], ["--max-iter", "2"]):
        for folders in ([], results, output):
            with pytest.raises(SystemExit):
                benchmark.parse_args(flag + folders)
            assert "give --results and --output other folders" in capsys.readouterr().err
        assert not benchmark.parse_args(flag + results + output).default_results


def test_the_report_keeps_one_schedule_and_the_variant_that_training_keeps(tmp_path, capsys):
    """A run left from before a schedule change neither wins a sweep nor enters a mean; of equal
    seed-0 APs the report names the variant training chose (the first in sweep order), not the
    first file name."""
    for variant, ap in (("lr0.0025", 5.0), ("lr0.005", 6.0), ("lr0.01", 8.0)):
        fake_result(tmp_path, "deepforest", "fcos", variant, 0, ap)
    fake_result(tmp_path, "deepforest", "fcos", "lr0.01-radius2.5", 0, 8.0)  # a tie
    fake_result(tmp_path, "deepforest", "fcos", "lr0.01", 1, 9.0)
    fake_result(tmp_path, "deepforest", "fcos", "lr0.01", 2, 30.0, max_iter=400)
    fake_result(tmp_path, "deepforest", "fcos", "lr0.0025", 3, 40.0, max_iter=400)
    row = benchmark_report.write_report(tmp_path, "today")["datasets"]["deepforest"]["rows"]
    chosen = benchmark.Benchmark(tmp_path, tmp_path / "out").chosen("deepforest", "fcos")
    assert row["fcos"]["variant"] == chosen.name == "lr0.01"
    assert row["fcos"]["seeds"] == [1] and row["fcos"]["AP"] == 9.0
    assert "lr0.01-seed2.json: 400 iterations, the schedule reported is 1200" in (
        capsys.readouterr().out
    )


def test_a_row_that_does_not_run_on_a_dataset_reads_not_applicable(tmp_path, monkeypatch):
    """A row whose method cannot apply to a dataset (here RM + PFI, made DeepForest-only): on
    Fashion scenes its cell and its target say so, rather than looking like a run to come."""
    only_deepforest = dataclasses.replace(ROWS["retinanet_rm_pfi"], datasets=("deepforest",))
    monkeypatch.setitem(ROWS, "retinanet_rm_pfi", only_deepforest)
    fake_result(tmp_path, "deepforest", "retinanet", "lr0.005", 0, 8.0)
    fake_result(tmp_path, "deepforest", "retinanet_rm_pfi", "lr0.005", 1, 9.0)
    fake_result(tmp_path, "fashion_scenes", "mimicdet", "lr0.005", 0, 40.0, max_iter=3600)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- benchmark-table -->\n<!-- /benchmark-table -->\n")
    summary = benchmark_report.write_report(tmp_path, "today", readme=readme)
    goals = {g["target"]: g for g in summary["datasets"]["fashion_scenes"]["targets"]}
    assert goals["MimicDet at least 2 AP above RetinaNet + RM + PFI"]["status"] == "not applicable"
    text = readme.read_text()
    assert "| RetinaNet + RM + PFI | 9.0 (9.9) | n/a | 100 |" in text
    assert "| MimicDet | – | 40.0 (44.0)* | – |" in text
    assert "| FCOS | – | – | – |" in text  # no run on either dataset yet, still a row
    assert "| MimicDet at least 2 AP above RetinaNet + RM + PFI | pending | n/a |" in text
    # a row whose runs exist but did not learn is not "not run yet"
    fake_result(tmp_path, "deepforest", "faster_rcnn", "lr0.005", 0, 0.0)
    benchmark_report.write_report(tmp_path, "today", readme=readme)
    text = readme.read_text()
    assert "| Faster R-CNN | none learned | – | – |" in text
    assert "none learned: its runs" in text
    assert "1200 iterations on DeepForest, 3600 iterations on Fashion scenes" in text
    # the legend explains each mark the table uses
    for used in ("* only the tuning run", "–: not run yet", "n/a: the row does not run"):
        assert used in text
    # and none it does not: with RM + PFI on both datasets again, no cell reads n/a
    monkeypatch.undo()
    benchmark_report.write_report(tmp_path, "today", readme=readme)
    text = readme.read_text()
    assert "| RetinaNet + RM + PFI | 9.0 (9.9) | – | 100 |" in text
    assert "n/a" not in text and "–: not run yet" in text and "raw" not in text


def test_targets_say_met_not_met_or_pending_with_the_measured_difference(tmp_path):
    for row, ap in (
        ("mimicdet", 12.0),
        ("fcos", 9.0),
        ("faster_rcnn", 12.5),
        ("mimicdet_nomimic", 11.5),
    ):
        for seed in (0, 1, 2):  # the tuning run, then the reported seeds
            fake_result(tmp_path, "deepforest", row, "lr0.005", seed, ap)
    # the speed target: MimicDet's network 60 ms (every run of it, the ablation's too), Faster
    # R-CNN 100 ms, against the same yardstick
    for row, seed in itertools.product(("mimicdet", "mimicdet_nomimic"), (1, 2)):
        path = benchmark.result_path(tmp_path, "deepforest", row, "lr0.005", seed)
        path.write_text(json.dumps({**json.loads(path.read_text()), "infer_ms": 60.0}))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- benchmark-table -->\n<!-- /benchmark-table -->\n")
    summary = benchmark_report.write_report(tmp_path, "today", readme=readme)
    goals = {g["target"]: g for g in summary["datasets"]["deepforest"]["targets"]}
    fcos = goals["MimicDet at least 2 AP above FCOS"]
    assert fcos["status"] == "met" and fcos["detail"] == "+3.0 AP (12.0 vs 9.0)"
    assert fcos["measured"] == "+3.0 AP"
    assert goals["MimicDet within 1 AP of Faster R-CNN"]["status"] == "met"  # -0.5
    mimic = goals["mimicking worth at least 1 AP"]
    assert mimic["status"] == "not met" and mimic["detail"].startswith("+0.5 AP")
    assert goals["shared backbone at least as good as separate"]["status"] == "pending"
    speed = goals["MimicDet at most 0.8x Faster R-CNN's inference time"]
    assert speed["status"] == "met" and speed["detail"] == speed["measured"] == "0.60x on CPU"
    assert not fcos["provisional"]  # reported seeds, not tuning runs
    assert (
        "| mimicking worth at least 1 AP | not met | +0.5 AP"
        in (tmp_path / "deepforest.md").read_text()
    )
    # the README lists every target beside the headline table, a column per dataset: status
    # and the measured difference; a target whose row has no run yet is pending
    text = readme.read_text()
    assert "| target | DeepForest |" in text
    assert "| MimicDet at least 2 AP above FCOS | met: +3.0 AP |" in text
    assert "| mimicking worth at least 1 AP | not met: +0.5 AP |" in text
    assert "| shared backbone at least as good as separate | pending |" in text
    assert "| MimicDet at most 0.8x Faster R-CNN's inference time | met: 0.60x on CPU |" in text
    # FCOS is due two reported seeds that learned: with one, whether its seed 2 failed or has
    # not run, its target stands on one seed's AP, so only provisionally
    fake_result(tmp_path, "deepforest", "fcos", "lr0.005", 2, 0.0)
    summary = benchmark_report.write_report(tmp_path, "today", readme=readme)
    text = readme.read_text()
    assert "| MimicDet at least 2 AP above FCOS | met (provisional): +3.0 AP |" in text
    goals = {g["target"]: g for g in summary["datasets"]["deepforest"]["targets"]}
    assert goals["MimicDet at least 2 AP above FCOS"]["detail"].startswith("+3.0 AP")
    assert goals["MimicDet at least 2 AP above FCOS"]["provisional"]
    benchmark.result_path(tmp_path, "deepforest", "fcos", "lr0.005", 2).unlink()
    summary = benchmark_report.write_report(tmp_path, "today")
    goals = {g["target"]: g for g in summary["datasets"]["deepforest"]["targets"]}
    assert goals["MimicDet at least 2 AP above FCOS"]["provisional"]
    assert not goals["mimicking worth at least 1 AP"]["provisional"]


def test_a_difference_just_short_of_a_margin_does_not_read_as_reaching_it(tmp_path):
    for row, ap in (("mimicdet", 12.0), ("fcos", 12.0 - 1.996)):
        for seed in (0, 1, 2):
            fake_result(tmp_path, "deepforest", row, "lr0.005", seed, ap)
    summary = benchmark_report.write_report(tmp_path, "today")
    goals = {g["target"]: g for g in summary["datasets"]["deepforest"]["targets"]}
    fcos = goals["MimicDet at least 2 AP above FCOS"]
    # one decimal would read "+2.0 AP ... not met"
    assert fcos["status"] == "not met" and fcos["detail"].startswith("+1.996 AP")


def test_the_speed_target_waits_for_one_scale_and_one_device(tmp_path):
    for row in ("mimicdet", "faster_rcnn"):
        for seed in (0, 1):
            fake_result(tmp_path, "deepforest", row, "lr0.005", seed, 10.0)
    path = benchmark.result_path(tmp_path, "deepforest", "mimicdet", "lr0.005", 1)
    gpu = {**json.loads(path.read_text()), "machine": "NVIDIA H200, torch 2.11, CUDA"}
    path.write_text(json.dumps({**gpu, "infer_ms": 5.0, "yardstick_ms": 2.0}))

    def speed():
        goals = benchmark_report.write_report(tmp_path, "today")["datasets"]["deepforest"]
        (goal,) = [g for g in goals["targets"] if "inference time" in g["target"]]
        return goal

    assert speed()["status"] == "pending" and "CUDA" in speed()["detail"]
    path.write_text(json.dumps({**gpu, "machine": "a CPU, 2 threads, CPU", "yardstick_ms": None}))
    assert speed()["detail"] == "a row timed without yardstick"
    # both on the CPU on one scale: MimicDet 100 ms against Faster R-CNN's 100 ms
    path.write_text(json.dumps({**gpu, "machine": "a CPU, 2 threads, CPU", "yardstick_ms": 50.0}))
    assert speed()["status"] == "not met" and speed()["detail"] == "1.00x on CPU"


def test_every_configs_own_key_value_is_one_of_its_candidates():
    """The report deems a sweep complete once the key's other candidates ran; that holds only
    if each config's own value is a candidate (else the pipeline would try one more)."""
    for dataset in DATASETS:
        for name, row in ROWS.items():
            if row.key is not None:
                value = benchmark.config_value(dataset, row)
                assert value in row.key.candidates, (dataset, name, value)


def test_a_sweep_is_complete_once_the_key_ran_at_the_best_learning_rate(tmp_path):
    runs = {"fcos": {}}
    for lr, ap in zip(LEARNING_RATES, (6.0, 8.0, 7.0)):
        runs["fcos"][f"lr{lr:g}"] = {0: {"final": {"AP": ap}}}
    assert benchmark_report.chosen_variant(runs, "fcos") == ("lr0.005", False)
    runs["fcos"]["lr0.01-radius2.5"] = {0: {"final": {"AP": 9.0}}}  # not at the best rate
    assert benchmark_report.chosen_variant(runs, "fcos") == ("lr0.01-radius2.5", False)
    runs["fcos"]["lr0.005-radius2.5"] = {0: {"final": {"AP": 7.5}}}
    assert benchmark_report.chosen_variant(runs, "fcos") == ("lr0.01-radius2.5", True)
    # an ablation takes its parent's choice
    runs["mimicdet"] = {"lr0.005": {0: {"final": {"AP": 1.0}}}}
    assert benchmark_report.chosen_variant(runs, "mimicdet_nomimic") == ("lr0.005", False)


def test_inference_is_reported_relative_to_the_yardstick_timed_beside_it(tmp_path):
    """Runs timed under different load compare through their yardstick; a run without one keeps
    its raw ms (†), and a training that shared the machine has its s/iter flagged (‡)."""
    for row, infer, yardstick, share in (
        ("fcos", 200.0, 100.0, 0.95),  # a loaded sitting: both twice as slow
        ("faster_rcnn", 90.0, 60.0, 0.5),  # another sitting; the training shared the CPU
        ("retinanet", 70.0, None, 0.95),  # recorded before the yardstick
    ):
        result = fake_result(tmp_path, "deepforest", row, "lr0.005", 0, 8.0)
        result.update(infer_ms=infer, yardstick_ms=yardstick, train_cpu_share=share)
        benchmark.result_path(tmp_path, "deepforest", row, "lr0.005", 0).write_text(
            json.dumps(result)
        )
    summary = benchmark_report.write_report(tmp_path, "today")
    data = summary["datasets"]["deepforest"]
    rows = data["rows"]
    # the table's scale: the median yardstick (80 ms); ratios 2.0 and 1.5
    assert data["yardstick_ms"] == {"CPU": 80.0}
    assert rows["fcos"]["infer_ms"] == pytest.approx(160.0)
    assert rows["faster_rcnn"]["infer_ms"] == pytest.approx(120.0)
    assert rows["retinanet"]["infer_ms"] == 70.0 and not rows["retinanet"]["infer_normalized"]
    table = (tmp_path / "deepforest.md").read_text()
    assert "| 1.00 | 160 |" in table and "| 1.00‡ | 120 |" in table and "| 70† |" in table


def test_rows_that_deploy_one_network_share_the_median_of_all_its_runs_timings(tmp_path):
    """MimicDet's ablations and RetinaNet's students deploy their parent's network: the table
    times it once, over every run of it, and says how far those runs spread; a network with
    another parameter count is its own. A --retime pass replaces that only if it timed every
    row: its many models interleaved are another setting than a run's own two."""

    def timed(row, seed, infer, params=5e6):
        result = fake_result(tmp_path, "deepforest", row, "lr0.005", seed, 8.0)
        result.update(infer_ms=infer, yardstick_ms=100.0, params=params)
        path = benchmark.result_path(tmp_path, "deepforest", row, "lr0.005", seed)
        path.write_text(json.dumps(result))

    for seed, infer in ((0, 900.0), (1, 150.0), (2, 160.0)):  # seed 0: the tuning run, unused
        timed("mimicdet", seed, infer)
    timed("mimicdet_nomimic", 1, 140.0)
    timed("mimicdet_cls_only", 1, 170.0)
    timed("retinanet", 0, 500.0)
    timed("retinanet", 1, 200.0)
    timed("retinanet_fgfi", 1, 240.0)
    timed("faster_rcnn", 0, 300.0, params=12e6)
    timed("faster_rcnn", 1, 400.0, params=12e6)
    rows = benchmark_report.write_report(tmp_path, "today")["datasets"]["deepforest"]["rows"]
    # MimicDet's network: the median of 150, 160, 140 and 170 ms over a 100 ms yardstick
    for name in ("mimicdet", "mimicdet_nomimic", "mimicdet_cls_only"):
        assert rows[name]["infer_ms"] == pytest.approx(155.0) and rows[name]["infer_runs"] == 4
    assert rows["mimicdet"]["infer_spread"] == pytest.approx((140 / 155, 170 / 155))
    for name in ("retinanet", "retinanet_fgfi"):  # 200 and 240 ms
        assert rows[name]["infer_ms"] == pytest.approx(220.0) and rows[name]["infer_runs"] == 2
    assert rows["faster_rcnn"]["infer_ms"] == pytest.approx(400.0)
    assert rows["faster_rcnn"]["infer_runs"] == 1
    table = (tmp_path / "deepforest.md").read_text()
    assert "runs of one network spread from -10% to +10%" in table
    assert "re-timed: every row in one interleaved pass" not in table

    # a student timed before the yardstick existed (raw ms) takes its network's time; a seed
    # timed with it after a first seed timed without counts, and its yardstick sets the scale
    path = benchmark.result_path(tmp_path, "deepforest", "retinanet_fgfi", "lr0.005", 1)
    path.write_text(json.dumps({**json.loads(path.read_text()), "yardstick_ms": None}))
    timed("retinanet_defeat", 1, 230.0)
    path = benchmark.result_path(tmp_path, "deepforest", "retinanet_defeat", "lr0.005", 1)
    path.write_text(json.dumps({**json.loads(path.read_text()), "yardstick_ms": None}))
    timed("retinanet_defeat", 2, 220.0)
    rows = benchmark_report.write_report(tmp_path, "today")["datasets"]["deepforest"]["rows"]
    for name in ("retinanet", "retinanet_fgfi", "retinanet_defeat"):  # 200 and 220 ms
        assert rows[name]["infer_ms"] == pytest.approx(210.0) and rows[name]["infer_normalized"]

    # a pass over every row's chosen variant replaces the runs' own timings, row by row
    names = ("mimicdet", "mimicdet_nomimic", "mimicdet_cls_only", "retinanet", "retinanet_fgfi")
    names += ("retinanet_defeat",)
    timing = {"date": "later", "machine": "a CPU, 2 threads, CPU", "yardstick_ms": 50.0}
    timing["rows"] = {n: {"variant": "lr0.005", "infer_ms": 60.0 + i} for i, n in enumerate(names)}
    path = tmp_path / "runs/deepforest/timing.json"
    path.write_text(json.dumps(timing))
    rows = benchmark_report.write_report(tmp_path, "today")["datasets"]["deepforest"]["rows"]
    assert not rows["mimicdet"]["infer_retimed"]  # Faster R-CNN is missing from the pass
    timing["rows"]["faster_rcnn"] = {"variant": "lr0.01", "infer_ms": 99.0}
    path.write_text(json.dumps(timing))
    rows = benchmark_report.write_report(tmp_path, "today")["datasets"]["deepforest"]["rows"]
    assert not rows["mimicdet"]["infer_retimed"]  # it timed another Faster R-CNN variant
    timing["rows"]["faster_rcnn"]["variant"] = "lr0.005"
    path.write_text(json.dumps(timing))
    rows = benchmark_report.write_report(tmp_path, "today")["datasets"]["deepforest"]["rows"]
    assert all(r["infer_retimed"] for r in rows.values())
    assert rows["mimicdet_nomimic"]["infer_ms"] == pytest.approx(61.0)
    assert rows["faster_rcnn"]["infer_ms"] == pytest.approx(99.0)
    table = (tmp_path / "deepforest.md").read_text()
    assert "re-timed: every row in one interleaved pass" in table


def test_inference_timing_interleaves_the_models_image_by_image():
    calls = []
    models = {name: (lambda image, name=name: calls.append((name, image))) for name in "ab"}
    times = benchmark.time_images(models, [1, 2, 3])
    # each image goes through both models before the next; the first model alternates
    assert calls == [("a", 1), ("b", 1), ("b", 2), ("a", 2), ("a", 3), ("b", 3)]
    assert {name: len(ms) for name, ms in times.items()} == {"a": 3, "b": 3}


def test_a_run_records_the_threads_it_trained_at_and_those_its_inference_was_timed_at():
    """A lane trains at one thread and times inference at every core in its quiet window: its
    record says both, and a run that did both at one count says that one."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        laned = benchmark.machine("cpu", infer_threads=2)
        assert "1 threads (inference timed at 2)" in laned
        alone = benchmark.machine("cpu", infer_threads=1)
        assert "1 threads," in alone and "inference" not in alone
        assert benchmark.machine("cpu") == alone
    finally:
        torch.set_num_threads(threads)
    assert benchmark_report.device_of(laned) == benchmark_report.device_of(alone) == "CPU"


def test_the_table_names_a_rows_machine_only_where_the_rows_came_from_different_ones(tmp_path):
    """Runs trained alone and in lanes (other threads) are one machine's; a row from another
    machine has its machine named on every row."""

    def run(row, ap, machine):
        for seed in (0, 1):  # the tuning run that chose the variant, and a reported seed
            result = fake_result(tmp_path, "deepforest", row, "lr0.005", seed, ap)
            path = benchmark.result_path(tmp_path, "deepforest", row, "lr0.005", seed)
            path.write_text(json.dumps({**result, "machine": machine}))

    run("fcos", 8.0, "a CPU, 2 threads, torch 2, CPU")
    run("retinanet", 7.0, "a CPU, 1 threads (inference timed at 2), torch 2, CPU")
    benchmark_report.write_report(tmp_path, "today")
    table = (tmp_path / "deepforest.md").read_text()
    assert "| FCOS | 8.0 |" in table and "| RetinaNet | 7.0 |" in table and " on a CPU" not in table
    run("faster_rcnn", 9.0, "another CPU, 2 threads, CPU")
    benchmark_report.write_report(tmp_path, "today")
    table = (tmp_path / "deepforest.md").read_text()
    assert "| 7.0 on a CPU, 1 threads (inference timed at 2), torch 2, CPU |" in table
    assert "| 9.0 on another CPU, 2 threads, CPU |" in table
    # seeds added later on another machine: each run of seeds of that row names its own
    for seed, ap in ((2, 6.0), (3, 7.0)):
        result = fake_result(tmp_path, "deepforest", "fcos", "lr0.005", seed, ap)
        path = benchmark.result_path(tmp_path, "deepforest", "fcos", "lr0.005", seed)
        path.write_text(json.dumps({**result, "machine": "another CPU, 1 threads, CPU"}))
    benchmark_report.write_report(tmp_path, "today")
    table = (tmp_path / "deepforest.md").read_text()
    cell = "| 8.0 on a CPU, 2 threads, torch 2, CPU; 6.0, 7.0 on another CPU, 1 threads, CPU |"
    assert cell in table


def test_the_cpu_share_counts_the_trainings_own_worker_processes():
    """A training's CPU time includes its data-loader workers (grandchildren of the benchmark)."""
    import subprocess

    burn = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass"
    spawn = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {burn!r}])"
    before = benchmark.cpu_seconds()
    subprocess.run([sys.executable, "-c", spawn], check=True)
    after = benchmark.cpu_seconds()
    assert after[0] - before[0] >= 0.5  # the grandchild's half second is counted
    share = benchmark.cpu_share(before, after)
    assert share is not None and 0 < share <= 1


@pytest.mark.slow
def test_a_distilled_row_trains_its_teacher_and_student_first_then_reports(tmp_path):
    """The pipeline end to end as a smoke run (1 iteration each, one learning rate, no key, 160
    px): Faster R-CNN (the teacher), RetinaNet (the student's choice), then RetinaNet + FGFI
    reading that teacher."""
    results = tmp_path / "results"
    out = tmp_path / "out"
    argv = [
        "--dataset",
        "deepforest",
        "--rows",
        "retinanet_fgfi",
        "--seeds",
        "1",
        "--smoke",
        "--max-iter",
        "1",
    ]
    benchmark.main(argv + ["--results", str(results), "--output", str(out)])
    student = json.loads(
        (results / "runs/deepforest/retinanet_fgfi/lr0.005-seed1.json").read_text()
    )
    assert student["teacher"]["variant"] == "lr0.005" and student["teacher"]["seed"] == 1
    # the digest of the weights that taught it
    teacher_weights = out / "deepforest/faster_rcnn/lr0.005-seed1/model_final.pth"
    assert student["teacher"]["sha256"] == benchmark.sha256(teacher_weights)
    assert "<output>/deepforest/faster_rcnn/lr0.005-seed1/model_final.pth" in student["opts"]
    assert "MODEL.DISTILL.FGFI.WEIGHT" in student["opts"] and student["max_iter"] == 1
    assert student["params"] > 0 and student["infer_ms"] > 0 and student["yardstick_ms"] > 0
    assert 0 < student["train_cpu_share"] <= 1
    # timed outside any lane: at the threads it trained at
    threads = torch.get_num_threads()
    assert student["machine"].endswith(f"{threads} threads, torch {torch.__version__}, CPU")
    # the student's own checkpoint and the deploy one (the student alone), by digest
    assert set(student["sha256"]) == {"model_final.pth", "model_deploy.pth"}
    assert all(len(digest) == 64 for digest in student["sha256"].values())
    for seed in (0, 1):  # the tuning run, and the teacher of the student's seed
        assert (results / f"runs/deepforest/faster_rcnn/lr0.005-seed{seed}.json").is_file()
    assert (results / "runs/deepforest/retinanet/lr0.005-seed0.json").is_file()
    assert "RetinaNet + FGFI" in (results / "deepforest.md").read_text()

    # re-timing reads the reported seed's checkpoints left in --output, in one interleaved pass
    # (RetinaNet itself ran its tuning seed only)
    benchmark.main(argv + ["--retime", "--results", str(results), "--output", str(out)])
    timing = json.loads((results / "runs/deepforest/timing.json").read_text())
    assert set(timing["rows"]) == {"faster_rcnn", "retinanet_fgfi"}
    assert all(t["infer_ms"] > 0 for t in timing["rows"].values()) and timing["yardstick_ms"] > 0
    # a pass that missed a row (RetinaNet) is not mixed into the table with the runs' own
    table = (results / "deepforest.md").read_text()
    assert "re-timed: every row in one interleaved pass" not in table

    # the same checkpoints, each at its weights and at its network's initial weights
    import timing_weights_check

    check = ["--dataset", "deepforest", "--smoke", "--max-iter", "1"]
    timing_weights_check.main(check + ["--results", str(results), "--output", str(out)])
    checked = json.loads((results / "runs/deepforest/weights_timing.json").read_text())
    assert checked["command"] == shlex.join(
        ["python", "tools/timing_weights_check.py", *check, "--results", str(results),
         "--output", str(out)]
    )  # fmt: skip
    # every seed of the chosen variants: the tuning runs too (RetinaNet has no other)
    assert set(checked["runs"]) == {
        "faster_rcnn/lr0.005-seed0", "faster_rcnn/lr0.005-seed1", "retinanet/lr0.005-seed0",
        "retinanet_fgfi/lr0.005-seed1",
    }  # fmt: skip
    for run in checked["runs"].values():
        assert run["infer_ms"] > 0 and run["infer_ms_initial_weights"] > 0
        assert run["detections_per_image"] >= 0 and run["checkpoint"].endswith(".pth")
    # the student is timed alone, as deployed
    student = checked["runs"]["retinanet_fgfi/lr0.005-seed1"]["checkpoint"]
    assert student.endswith("model_deploy.pth")


def test_the_weights_check_times_only_checkpoints_that_a_committed_result_names(tmp_path, capsys):
    """A folder's model_final.pth is timed only if the run's committed result has its digest: a
    checkpoint left from an earlier config, or trained again since, is not the run reported."""
    import timing_weights_check

    results, out = tmp_path / "results", tmp_path / "out"
    bench = benchmark.Benchmark(results, out, max_iter=1200, smoke=True)  # one rate: lr0.005
    for seed, weights in ((0, b"reported"), (1, b"retrained since")):
        result = fake_result(results, "deepforest", "retinanet", "lr0.005", seed, 8.0)
        result["sha256"] = {"model_final.pth": hashlib.sha256(b"reported").hexdigest()}
        benchmark.result_path(results, "deepforest", "retinanet", "lr0.005", seed).write_text(
            json.dumps(result)
        )
        folder = bench.run_dir("deepforest", "retinanet", "lr0.005", seed)
        folder.mkdir(parents=True)
        (folder / "model_final.pth").write_bytes(weights)
    copy = bench.run_dir("deepforest", "retinanet", "lr0.005", 0).with_name("lr0.005-seed0.bak")
    copy.mkdir()
    (copy / "model_final.pth").write_bytes(b"reported")  # the right digest, in no run's folder
    found = timing_weights_check.checkpoints(bench, "deepforest")
    assert [(row, variant.name, seed) for row, variant, seed, _ in found] == [
        ("retinanet", "lr0.005", 0)
    ]
    printed = capsys.readouterr().out
    assert "lr0.005-seed1/model_final.pth: not the checkpoint of a committed result" in printed
    assert "lr0.005-seed0.bak/model_final.pth: not in a run's folder" in printed


def finished_trainings(monkeypatch, weights=b"weights"):
    """train_net.py replaced by one that finishes at once (``weights`` as model_final.pth, AP 9
    at 1200); returns the list its commands are appended to."""
    trainings = []

    def train_net(command, **kwargs):
        trainings.append(command)
        out = Path(command[command.index("OUTPUT_DIR") + 1])
        (out / "model_final.pth").write_bytes(weights)
        final = {"iteration": 1200, "bbox/AP": 9.0}
        (out / "metrics.json").write_text(json.dumps(final) + "\n")

    monkeypatch.setattr(benchmark.subprocess, "run", train_net)
    return trainings


def test_an_interrupted_run_resumes_only_under_the_command_that_started_it(tmp_path):
    """A checkpoint resumes under the same train_net.py arguments; one of another command (a
    schedule grown since) or of an unknown one is removed, never finished on the new steps."""
    out = tmp_path / "lr0.005-seed1"
    assert not benchmark.resumable(out, ["--config-file", "a.yaml", "SOLVER.MAX_ITER", "1200"])
    (out / "last_checkpoint").write_text("model_0000199.pth")
    (out / "model_0000199.pth").write_bytes(b"weights")
    assert benchmark.resumable(out, ["--config-file", "a.yaml", "SOLVER.MAX_ITER", "1200"])
    assert (out / "model_0000199.pth").is_file()

    assert not benchmark.resumable(out, ["--config-file", "a.yaml", "SOLVER.MAX_ITER", "3600"])
    assert not (out / "model_0000199.pth").exists() and not (out / "last_checkpoint").exists()

    (out / benchmark.RUN_COMMAND_FILE).unlink()  # a folder of a benchmark that did not record
    (out / "last_checkpoint").write_text("model_0000199.pth")
    assert not benchmark.resumable(out, ["--config-file", "a.yaml", "SOLVER.MAX_ITER", "3600"])
    assert not (out / "last_checkpoint").exists()

    # killed after its first evaluation, before its first checkpoint: nothing to resume, and
    # its records must not enter the next training's curve and step times
    (out / "metrics.json").write_text(json.dumps({"iteration": 99, "bbox/AP": 5.0}) + "\n")
    assert not benchmark.resumable(out, ["--config-file", "a.yaml", "SOLVER.MAX_ITER", "3600"])
    assert not (out / "metrics.json").exists()


def test_a_finished_run_is_read_back_only_under_the_command_that_trained_it(tmp_path, monkeypatch):
    """A finished checkpoint counts as the run only for the same train_net.py arguments and, for
    a student, the same teacher weights: another schedule's, or a student of a teacher trained
    again since, is trained anew (not resumed)."""
    trainings = finished_trainings(monkeypatch)
    bench = benchmark.Benchmark(tmp_path / "results", tmp_path / "out")
    row = ROWS["retinanet_fgfi"]
    variant = bench.sweep("deepforest", "retinanet")[0]
    out = bench.run_dir("deepforest", row.name, variant.name, 1)

    def train(bench=bench, teacher="a" * 64):
        return bench.train("deepforest", row, variant, 1, out, teacher_sha256=teacher)

    train()
    assert len(trainings) == 1
    train()
    assert len(trainings) == 1  # finished under this command: read back
    train(teacher="b" * 64)
    assert len(trainings) == 2
    eval_600 = benchmark.Benchmark(tmp_path / "results", tmp_path / "out", eval_period=600)
    train(eval_600, "b" * 64)
    assert len(trainings) == 3
    assert trainings[-1][trainings[-1].index("TEST.EVAL_PERIOD") + 1] == "600"
    # a folder from before commands were recorded: its finished run is read back
    (out / benchmark.RUN_COMMAND_FILE).unlink()
    train()
    assert len(trainings) == 3

    # interrupted (a checkpoint, no model_final.pth): resumed only on the same teacher's weights
    (out / "model_final.pth").unlink()
    (out / "last_checkpoint").write_text("model_0000599.pth")
    (out / benchmark.RUN_COMMAND_FILE).write_text(json.dumps(trainings[-1][1:] + ["x"]))
    train(eval_600, "c" * 64)
    assert "--resume" not in trainings[-1]
    (out / "model_final.pth").unlink()
    (out / "last_checkpoint").write_text("model_0000599.pth")
    train(eval_600, "c" * 64)
    assert "--resume" in trainings[-1]


def trained_retinanet_run(tmp_path, monkeypatch):
    """DeepForest RetinaNet's first variant, seed 0, trained by :func:`finished_trainings`' fake
    train_net.py: its list of commands, the Benchmark, the row, the variant and the run folder."""
    trainings = finished_trainings(monkeypatch)
    bench = benchmark.Benchmark(tmp_path / "results", tmp_path / "out")
    row = ROWS["retinanet"]
    variant = bench.sweep("deepforest", "retinanet")[0]
    out = bench.run_dir("deepforest", row.name, variant.name, 0)
    bench.train("deepforest", row, variant, 0, out)
    return trainings, bench, row, variant, out


def test_a_run_stopped_in_its_final_evaluation_resumes_into_that_evaluation(
    tmp_path, monkeypatch
):
    """model_final.pth written, the evaluation after it lost: the run is resumed (train_net.py
    then evaluates model_final.pth and trains no step), not trained again from scratch."""
    trainings, bench, row, variant, out = trained_retinanet_run(tmp_path, monkeypatch)
    assert "--resume" not in trainings[-1]

    (out / "last_checkpoint").write_text("model_final.pth")
    (out / "metrics.json").write_text(json.dumps({"iteration": 1199, "total_loss": 0.5}) + "\n")
    (out / "log.txt").write_text("the stopped training's log")
    bench.train("deepforest", row, variant, 0, out)
    assert len(trainings) == 2 and "--resume" in trainings[-1]
    assert (out / "log.txt").is_file(), "the run folder was emptied"
    # train_net.py records that evaluation one past the schedule (tests/test_train_net.py)
    (out / "metrics.json").write_text(json.dumps({"iteration": 1201, "bbox/AP": 9.0}) + "\n")
    assert benchmark.finished(out / "metrics.json", 1200)


def test_a_run_folder_of_an_earlier_config_is_trained_anew(tmp_path, monkeypatch):
    """The config's resolved content is part of a run's command: after a config change (a
    GroupNorm added to a head), its interrupted run starts over instead of loading the old
    checkpoint into the new model, and its finished run is trained again. A folder recorded
    before the digest was resumes on the rest of its command."""
    trainings, bench, row, variant, out = trained_retinanet_run(tmp_path, monkeypatch)
    recorded = benchmark.recorded_command(out)
    digests = [a for a in recorded if a.startswith(benchmark.CONFIG_DIGEST_ARGUMENT)]
    digest = benchmark.config_digest("deepforest", row)
    assert digests == [benchmark.CONFIG_DIGEST_ARGUMENT + digest]

    def interrupted(record):
        (out / "model_final.pth").unlink(missing_ok=True)
        (out / "last_checkpoint").write_text("model_0000599.pth")
        (out / benchmark.RUN_COMMAND_FILE).write_text(json.dumps(record))
        bench.train("deepforest", row, variant, 0, out)
        return "--resume" in trainings[-1]

    assert interrupted(recorded)
    earlier_config = [a for a in recorded if a not in digests] + ["config_sha256=0123456789abcdef"]
    assert not interrupted(earlier_config)
    assert interrupted([a for a in recorded if a not in digests])  # recorded before digests

    # finished under an earlier config: trained again, not read back
    (out / benchmark.RUN_COMMAND_FILE).write_text(json.dumps(earlier_config))
    before = len(trainings)
    bench.train("deepforest", row, variant, 0, out)
    assert len(trainings) == before + 1 and "--resume" not in trainings[-1]

    # the digest follows the config's content as read now, the files it reads included
    retinanet = benchmark.config_digest("deepforest", row)
    assert retinanet != benchmark.config_digest("deepforest", ROWS["faster_rcnn"])
    # a LazyConfig loads under a random package name each time: its digest must not follow it
    fcos = benchmark.config_digest("deepforest", ROWS["fcos"])
    assert benchmark.config_digest("deepforest", ROWS["fcos"]) == fcos
    real = benchmark.read_config

    def with_other_norm(dataset, row_):
        cfg = real(dataset, row_)
        cfg.MODEL.RETINANET.NORM = ""
        return cfg

    monkeypatch.setattr(benchmark, "read_config", with_other_norm)
    assert benchmark.config_digest("deepforest", row) != retinanet


def test_the_distillers_keys_define_only_a_distilled_rows_config(monkeypatch):
    """A change to MODEL.DISTILL, which only a distiller reads, leaves the other rows' run
    folders resumable (the distiller's fix of 2026-12-06 came while MimicDet trained)."""
    rows = ("retinanet", "mimicdet", "faster_rcnn", "retinanet_fgfi")
    before = {name: benchmark.config_digest("deepforest", ROWS[name]) for name in rows}
    real = benchmark.read_config

    def with_another_distiller_default(dataset, row_):
        cfg = real(dataset, row_)
        cfg.MODEL.DISTILL.FGFI.PSI = 0.25
        return cfg

    monkeypatch.setattr(benchmark, "read_config", with_another_distiller_default)
    after = {name: benchmark.config_digest("deepforest", ROWS[name]) for name in rows}
    assert [after[name] == before[name] for name in rows] == [True, True, True, False]


def test_a_committed_teachers_weights_teach_as_they_are(tmp_path, monkeypatch):
    """The teacher folder that holds its committed run's weights is read back even when the
    benchmark's commands changed since: a committed model is never deleted and retrained. Other
    weights in that folder are trained again under the current command."""
    trainings = finished_trainings(monkeypatch, weights=b"retrained")
    bench = benchmark.Benchmark(tmp_path, tmp_path / "out")
    for row in ("retinanet", "faster_rcnn"):
        for variant in ("lr0.0025", "lr0.005", "lr0.01", "lr0.005-anchor16"):
            fake_result(
                tmp_path, "deepforest", row, variant, 0, 12.0 if variant == "lr0.005" else 5
            )
    t_out = bench.run_dir("deepforest", "faster_rcnn", "lr0.005", 1)
    t_out.mkdir(parents=True)
    (t_out / "model_final.pth").write_bytes(b"committed")
    (t_out / "metrics.json").write_text(json.dumps({"iteration": 1200, "bbox/AP": 13.0}) + "\n")
    (t_out / benchmark.RUN_COMMAND_FILE).write_text(json.dumps(["an", "older", "command"]))
    fake_result(tmp_path, "deepforest", "faster_rcnn", "lr0.005", 1, 13.0)
    path = benchmark.result_path(tmp_path, "deepforest", "faster_rcnn", "lr0.005", 1)
    committed = json.loads(path.read_text())
    committed["sha256"] = {"model_final.pth": benchmark.sha256(t_out / "model_final.pth")}
    path.write_text(json.dumps(committed))

    student = bench.chosen("deepforest", "retinanet")
    _, teacher = bench.teacher("deepforest", ROWS["retinanet_fgfi"], student, 1)
    assert trainings == [] and (t_out / "model_final.pth").read_bytes() == b"committed"
    assert teacher["sha256"] == committed["sha256"]["model_final.pth"]

    (t_out / "model_final.pth").write_bytes(b"other weights")
    _, teacher = bench.teacher("deepforest", ROWS["retinanet_fgfi"], student, 1)
    assert len(trainings) == 1 and (t_out / "model_final.pth").read_bytes() == b"retrained"
    assert teacher["sha256"] == benchmark.sha256(t_out / "model_final.pth")


def test_the_committed_results_report_the_benchmarks_schedules_whatever_the_flags(
    tmp_path, monkeypatch
):
    """`--report --smoke` (or --unpack with --max-iter) into benchmarks/ must not report the
    committed runs as if of a 3-iteration schedule, which would leave every table empty."""
    reports = []
    monkeypatch.setattr(benchmark, "DEFAULT_RESULTS", tmp_path)
    monkeypatch.setattr(benchmark, "write_report", lambda *a, **kw: reports.append(kw))
    benchmark.main(["--report", "--smoke"])
    assert reports[-1]["max_iters"] is None  # the datasets' own schedules
    benchmark.main(["--report", "--smoke", "--results", str(tmp_path / "smoke")])
    assert reports[-1]["max_iters"]["deepforest"] == benchmark.SMOKE_ITERS


def test_training_steps_are_timed_interleaved_each_with_its_own_iteration():
    """Every trainer warms up, then each round runs each trainer's steps in turn, the first
    trainer turning each round; a step sees its own trainer's iteration in its event storage."""
    from detectron2.utils.events import get_event_storage

    calls = []

    class FakeTrainer:
        def __init__(self, name):
            self.name, self.iter = name, 0

        def run_step(self):
            calls.append((self.name, get_event_storage().iter))

    trainers = {name: FakeTrainer(name) for name in "ab"}
    times = benchmark.time_training_steps(trainers, warmup=1, steps=2, rounds=2)
    assert calls == [
        ("a", 0), ("b", 0),  # warm-up
        ("a", 1), ("a", 2), ("b", 1), ("b", 2),  # round 1
        ("b", 3), ("b", 4), ("a", 3), ("a", 4),  # round 2: b first
    ]  # fmt: skip
    assert {name: len(s) for name, s in times.items()} == {"a": 4, "b": 4}
    assert all(t >= 0 for s in times.values() for t in s)


def test_retimed_training_steps_replace_those_of_the_rows_variant_only(tmp_path):
    """The s/iter of --retime-training (one interleaved pass) replaces the rows' own trainings'
    where it timed their chosen variant (§, and no ‡ since the pass had every row beside it);
    a row timed at another variant keeps its trainings' s/iter."""
    for row in ("retinanet", "fcos"):
        result = fake_result(tmp_path, "deepforest", row, "lr0.005", 0, 8.0)
        result.update(train_cpu_share=0.5)  # both trainings shared the machine
        benchmark.result_path(tmp_path, "deepforest", row, "lr0.005", 0).write_text(
            json.dumps(result)
        )
    timing = {
        "date": "today", "machine": "a CPU", "warmup_steps": 2, "timed_steps": 15,
        "rows": {
            "retinanet": {"variant": "lr0.005", "train_s_per_iter": 0.4},
            "fcos": {"variant": "lr0.01", "train_s_per_iter": 0.3},  # not fcos's choice
        },
    }  # fmt: skip
    (tmp_path / "runs/deepforest/train_timing.json").write_text(json.dumps(timing))
    rows = benchmark_report.write_report(tmp_path, "today")["datasets"]["deepforest"]["rows"]
    assert rows["retinanet"]["train_s_per_iter"] == 0.4 and rows["retinanet"]["train_retimed"]
    assert rows["fcos"]["train_s_per_iter"] == 1.0 and not rows["fcos"]["train_retimed"]
    table = (tmp_path / "deepforest.md").read_text()
    assert "| 0.40§ |" in table and "| 1.00‡ |" in table
    assert "`python tools/benchmark.py --retime-training`" in table


def test_a_retime_training_pass_is_kept_while_it_times_every_chosen_row_at_its_variant(
    tmp_path, monkeypatch, capsys
):
    """A stages file with --retime-training can be started over after a stop: a pass that already
    times exactly the rows and variants the next would is kept, not built again; one that misses a
    row, or timed another variant, is redone."""
    for row in ("retinanet", "fcos", "faster_rcnn"):
        fake_result(tmp_path, "deepforest", row, "lr0.005", 0, 8.0, max_iter=benchmark.SMOKE_ITERS)
    bench = benchmark.Benchmark(tmp_path, tmp_path / "out", smoke=True)  # one rate: lr0.005
    timed = bench.retimed_variants("deepforest")
    students = {"retinanet_fgfi", "retinanet_defeat", "retinanet_rm_pfi"}
    # the distilled students come with their teacher's choice
    assert set(timed) == {"retinanet", "fcos", "faster_rcnn", *students}

    built = []

    def build_training(config, opts, device):
        built.append(config)
        raise RuntimeError("built")

    monkeypatch.setattr(benchmark, "build_training", build_training)
    rows = {name: {"variant": "lr0.005", "train_s_per_iter": 0.5} for name in timed}
    path = tmp_path / "runs/deepforest/train_timing.json"
    path.write_text(json.dumps({"date": "then", "rows": rows}))
    assert bench.retime_training("deepforest")["date"] == "then"
    assert not built and "kept (delete it to time again)" in capsys.readouterr().out
    for stale in ({**rows, "fcos": {"variant": "lr0.01"}}, {k: rows[k] for k in students}):
        path.write_text(json.dumps({"date": "then", "rows": stale}))
        with pytest.raises(RuntimeError, match="built"):
            bench.retime_training("deepforest")
    assert len(built) == 2


@pytest.mark.slow
def test_retiming_training_builds_every_chosen_row_as_train_net_does(tmp_path):
    """A smoke --retime-training of the rows whose detectors chose (yacs RetinaNet and Faster
    R-CNN, LazyConfig FCOS, and the distillers, whose teacher checkpoint is not here) times each
    one's real training step and reports it."""
    results = tmp_path / "results"
    argv = ["--dataset", "deepforest", "--smoke", "--retime-training"]
    argv += ["--results", str(results), "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="no row of --dataset has a chosen variant"):
        benchmark.main(argv)  # no sweep has run yet
    for row in ("retinanet", "fcos", "faster_rcnn"):
        fake_result(results, "deepforest", row, "lr0.005", 0, 8.0, max_iter=benchmark.SMOKE_ITERS)
    benchmark.main(argv)
    timing = json.loads((results / "runs/deepforest/train_timing.json").read_text())
    expected = {"retinanet", "fcos", "faster_rcnn"}
    expected |= {"retinanet_fgfi", "retinanet_defeat", "retinanet_rm_pfi"}
    assert set(timing["rows"]) == expected
    assert all(t["variant"] == "lr0.005" for t in timing["rows"].values())
    assert all(t["train_s_per_iter"] > 0 for t in timing["rows"].values())
    # the spread a ratio of two medians has to be read against
    assert all(
        t["train_s_per_iter_quartiles"][0]
        <= t["train_s_per_iter"]
        <= t["train_s_per_iter_quartiles"][1]
        for t in timing["rows"].values()
    )
    assert timing["timed_steps"] == 2 and timing["warmup_steps"] == 1
    # the table's rows (those with a run) show the re-timed step
    assert (results / "deepforest.md").read_text().count("§ |") == 3
