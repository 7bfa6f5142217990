"""
What ``tools/benchmark.py`` trains: the datasets, the rows (detectors and ablations), the shared
tuning sweep and each detector's own key. Only data lives here; the pipeline is in benchmark.py.

Fairness rules, enforced by construction:
- every row of a dataset starts from that dataset's config folder, whose files share one base
  (backbone, FPN width, input sizes, batch, augmentation, solver): only the detector differs;
- every *tuned* row (a detector of its own: MimicDet, RetinaNet, FCOS, Faster R-CNN) gets the same
  budget: the three learning rates of ``LEARNING_RATES`` at seed 0, then the other values of one
  key of its own at the best of them, all at the full schedule, chosen by final val AP;
- an ablation or a distilled student is its parent's chosen variant with one change, as in the
  papers: it inherits the parent's learning rate and key and is not tuned again.
"""

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

# the shared sweep: half, once and twice the base configs' 0.005 (batch 2)
LEARNING_RATES = (0.0025, 0.005, 0.01)


@dataclass(frozen=True)
class Dataset:
    name: str
    title: str
    configs: str  # folder of the detector configs
    prepare: Tuple[str, ...]  # the command that writes the data (a no-op when it is there)
    val: str  # registered val split: periodic and final COCOEvaluator
    max_iter: int  # the schedule of every row; LR steps and warm-up scale with it
    eval_period: int  # AP-vs-iteration resolution
    timing_images: int = 20  # val images timed at batch 1


DATASETS = {
    "deepforest": Dataset(
        name="deepforest",
        title="DeepForest (real aerial tree crowns, 1 class)",
        configs="configs/DeepForest",
        prepare=("tools/prepare_deepforest.py",),
        val="deepforest_val",
        # 33 epochs of the 72 train tiles, 6x the demo's 200 iterations
        max_iter=1200,
        # 20 val tiles: ~10 s an evaluation (FCOS runs, 2026-12-02)
        eval_period=100,
    ),
    "fashion_scenes": Dataset(
        name="fashion_scenes",
        title="Fashion scenes (real product photos in synthetic scenes, 10 classes)",
        configs="configs/FashionScenes",
        prepare=("tools/prepare_fashion_scenes.py",),
        val="fashion_scenes_val",
        # 9 epochs of the 800 train scenes. At 1200 iterations (3 epochs) MimicDet's AP still
        # rose 4.8 over the last 200; on this schedule it rose 1.0 over the last 300 (a probe of
        # MimicDet lr 0.005, 2026-12-03, docs/benchmarks.md)
        max_iter=3600,
        # 100 val scenes, 5x DeepForest's, ~11 s an evaluation: 12 points a curve
        eval_period=300,
    ),
}


@dataclass(frozen=True)
class Key:
    """
    A detector's own swept key. The LR sweep runs with the config's value; afterwards every other
    value of ``candidates`` is tried at the best learning rate. ``read`` maps the config's raw
    value to a candidate, ``write`` a candidate to the override's value.
    """

    label: str  # short name in variant names and tables
    name: str  # yacs key or LazyConfig path
    candidates: Tuple
    read: Callable = float
    write: Callable = str

    def opts(self, value, lazy):
        if lazy:
            return [f"{self.name}={self.write(value)}"]
        return [self.name, self.write(value)]


def anchor_sizes(base):
    """detectron2's 3 scales per octave on P3..P7 from a P3 base size (32: its default)."""
    sizes = [base * 2**level for level in range(5)]
    return str([[s, s * 2 ** (1 / 3), s * 2 ** (2 / 3)] for s in sizes])


# RetinaNet's and the RPN's anchors: detectron2's 32 px on P3, or one octave smaller for small
# objects (the example); both keys use this one, so a teacher's RPN can match a student
ANCHOR_KEY = Key(
    label="anchor",
    name="MODEL.ANCHOR_GENERATOR.SIZES",
    candidates=(32.0, 16.0),
    read=lambda sizes: float(sizes[0][0]),
    write=lambda base: anchor_sizes(float(base)),
)


@dataclass(frozen=True)
class Row:
    name: str
    title: str
    config: str  # file name inside the dataset's config folder
    parent: Optional[str] = None  # None: a tuned detector; else whose choice it takes
    # the row's one change (yacs pairs); a row with a parent changes its training only, and
    # the report times it as its parent's deploy network (benchmark_report.deploy_network)
    opts: Tuple[str, ...] = ()
    key: Optional[Key] = None  # tuned detectors only
    teacher: Optional[str] = None  # distilled rows: the row whose checkpoint teaches
    seeds: int = 1  # reported seeds (1..seeds); seed 0 is the tuning sweep's
    paper: str = ""  # what the row stands for, for the tables
    deploy: bool = False  # MimicDet: time and count the deploy model (no T-head)
    # MimicDet: also score its training-only T-head as a two-stage detector after training, to
    # tell a student that lags its teacher from a teacher that lags (tools/evaluate_teacher.py)
    t_head: bool = False
    # the datasets it runs on: every one, unless its method cannot apply
    datasets: Tuple[str, ...] = ("deepforest", "fashion_scenes")
    # a distilled row that reads the teacher per student anchor (RM+PFI)
    needs_teacher_anchors: bool = False


def distill_opts(method_opts):
    """A RetinaNet student (the dataset's retinanet config) wrapped by the Distiller."""
    return (
        "MODEL.META_ARCHITECTURE", "Distiller",
        "MODEL.DISTILL.STUDENT_META_ARCHITECTURE", "RetinaNet",
        "MODEL.DISTILL.FEATURES", "['p3', 'p4', 'p5', 'p6', 'p7']",
        *method_opts,
    )  # fmt: skip


ROWS = {
    r.name: r
    for r in (
        Row(
            "mimicdet", "MimicDet", "mimicdet_MNV2_FPN.yaml",
            # the paper's 4 x stride, or DeepForest's one 8 x stride anchor (a 64 px P3 anchor)
            key=Key("anchor_scale", "MODEL.MIMICDET.REFINE.ANCHOR_SIZE_PER_STRIDE", (4.0, 8.0)),
            seeds=2, deploy=True, t_head=True, paper="MimicDet",
        ),
        Row(
            "mimicdet_nomimic", "MimicDet, no mimicking", "mimicdet_MNV2_FPN.yaml",
            parent="mimicdet", opts=("MODEL.MIMICDET.MIMIC.ENABLED", "False"),
            seeds=2, deploy=True, t_head=True, paper="ablation: mimicking off",
        ),
        Row(
            "mimicdet_cls_only", "MimicDet, cls mimic only", "mimicdet_MNV2_FPN.yaml",
            parent="mimicdet", opts=("MODEL.MIMICDET.MIMIC.PATHS", "['cls']"),
            deploy=True, t_head=True, paper="ablation: single path",
        ),
        Row(
            "mimicdet_reg_only", "MimicDet, reg mimic only", "mimicdet_MNV2_FPN.yaml",
            parent="mimicdet", opts=("MODEL.MIMICDET.MIMIC.PATHS", "['reg']"),
            deploy=True, t_head=True, paper="ablation: single path",
        ),
        Row(
            "mimicdet_same_level", "MimicDet, T-head on the S-head's level",
            "mimicdet_MNV2_FPN.yaml",
            parent="mimicdet", opts=("MODEL.MIMICDET.STAGGERED", "False"),
            deploy=True, t_head=True, paper="ablation: staggered off",
        ),
        Row(
            "mimicdet_separate", "MimicDet, separate T-head backbone", "mimicdet_MNV2_FPN.yaml",
            parent="mimicdet", opts=("MODEL.MIMICDET.T_HEAD.BACKBONE", "separate_joint"),
            deploy=True, t_head=True, paper="ablation: shared vs separate backbone",
        ),
        # the paper's S-head and T-head where the benchmark configs depart from it: the
        # positives-first mining chosen on one-class DeepForest (which Fashion inherits), and the
        # T-head's CPU-sized budget (64 samples, 128-channel convs; its 512-d fcs stay, as the
        # S-head's regression feature that mimics them sets the deploy model's width)
        Row(
            "mimicdet_top_loss", "MimicDet, the paper's top-loss S-head mining",
            "mimicdet_MNV2_FPN.yaml",
            parent="mimicdet", opts=("MODEL.MIMICDET.S_HEAD.HARD_MINING", "top_loss"),
            deploy=True, t_head=True, paper="ablation: S-head design",
        ),
        Row(
            "mimicdet_paper_t_head", "MimicDet, T-head with the paper's 128 samples, 256 channels",
            "mimicdet_MNV2_FPN.yaml",
            parent="mimicdet",
            opts=(
                "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "128",
                "MODEL.MIMICDET.T_HEAD.CONV_DIM", "256",
            ),
            deploy=True, t_head=True, paper="ablation: T-head design",
        ),
        Row("retinanet", "RetinaNet", "retinanet_MNV2_FPN.yaml", key=ANCHOR_KEY,
            paper="one-stage"),
        Row(
            "fcos", "FCOS", "fcos_MNV2_FPN.py",
            # FCOS's centre sampling radius (strides): its default, or wider for small objects
            key=Key("radius", "model.center_sampling_radius", (1.5, 2.5)),
            seeds=2, paper="one-stage",
        ),
        Row("faster_rcnn", "Faster R-CNN", "faster_rcnn_MNV2_FPN.yaml", key=ANCHOR_KEY,
            seeds=2, paper="two-stage reference, teacher"),
        Row(
            "retinanet_fgfi", "RetinaNet + FGFI", "retinanet_MNV2_FPN.yaml",
            parent="retinanet", teacher="faster_rcnn",
            opts=distill_opts(("MODEL.DISTILL.FGFI.WEIGHT", "0.01")),
            paper="distillation from Faster R-CNN",
        ),
        Row(
            "retinanet_defeat", "RetinaNet + DeFeat", "retinanet_MNV2_FPN.yaml",
            parent="retinanet", teacher="faster_rcnn",
            opts=distill_opts(
                ("MODEL.DISTILL.DEFEAT.FG_WEIGHT", "4.0", "MODEL.DISTILL.DEFEAT.BG_WEIGHT", "16.0")
            ),
            paper="distillation from Faster R-CNN",
        ),
        Row(
            "retinanet_rm_pfi", "RetinaNet + RM + PFI", "retinanet_MNV2_FPN.yaml",
            parent="retinanet", teacher="faster_rcnn",
            opts=distill_opts(
                (
                    "MODEL.DISTILL.RANK.WEIGHT", "4.0",
                    "MODEL.DISTILL.RANK.SCORE", "probability",
                    "MODEL.DISTILL.PFI.WEIGHT", "1.5",
                    "MODEL.DISTILL.PFI.PREDICTION_GAP", "probability",
                )
            ),
            paper="distillation from Faster R-CNN",
            # PFI reads the teacher's RPN at every student anchor, and weighs by the gap of
            # probabilities: the RPN's background logits sit far below the student's, so the logit
            # gap weighed that offset (since 2026-12-07, docs/distillation.md); Rank Mimicking
            # ranks the RPN's candidates by the teacher's second stage, by probabilities (the
            # default, named so that runs ranked by logits, before 2026-12-07, are not reused)
            needs_teacher_anchors=True,
        ),
    )  # fmt: skip
}


def variant_name(lr, key=None, value=None):
    """``lr0.005`` or ``lr0.005-anchor16``: the folder and file stem of a run."""
    name = f"lr{lr:g}"
    return name if key is None else f"{name}-{key.label}{value:g}"


def root_row(name):
    """The tuned detector whose choice ``name`` takes: itself, or its parent's root."""
    while ROWS[name].parent is not None:
        name = ROWS[name].parent
    return name
