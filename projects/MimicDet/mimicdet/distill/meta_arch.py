"""The distiller: a detectron2 dense detector (the student) trained with knowledge-distillation
terms from a separate, frozen teacher detector."""

import logging
import os
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import LazyConfig, configurable, instantiate
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from ..config import get_mimicdet_cfg
from .dense_view import (
    DenseView,
    anchor_generator_of,
    dense_view,
    per_anchor_logits,
    rank_targets,
    same_anchors,
)
from .losses import (
    check_pfi_prediction_gap,
    check_rank_score,
    defeat_losses,
    fgfi_loss,
    pfi_loss,
    rank_mimic_loss,
)
from .masks import defeat_foreground_masks, fgfi_masks
from .teacher import FrozenTeacher, load_teacher_weights

__all__ = ["Distiller", "build_teacher", "distiller_arguments"]

logger = logging.getLogger(__name__)


def build_teacher(
    config_file: str,
    weights: str,
    device: str,
    allow_random: bool = False,
    opts: Sequence[str] = (),
) -> FrozenTeacher:
    """
    The teacher: built from its own config file (yacs ``.yaml`` or LazyConfig ``.py``) with
    ``opts`` applied (``MODEL.DISTILL.TEACHER.OPTS``) on the student's device, loaded strictly
    from its checkpoint, frozen. Without a checkpoint it is refused unless ``allow_random``
    (``MODEL.DISTILL.TEACHER.ALLOW_RANDOM``: tests, smoke runs).
    """
    if not config_file:
        raise ValueError("MODEL.DISTILL.TEACHER.CONFIG_FILE is empty: the teacher needs a config")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"MODEL.DISTILL.TEACHER.CONFIG_FILE {config_file} does not exist")
    if config_file.endswith(".py"):
        lazy = LazyConfig.apply_overrides(LazyConfig.load(config_file), list(opts))
        model = instantiate(lazy.model)
        if isinstance(model, Distiller):
            raise ValueError(f"The teacher config {config_file} is itself a distiller")
        model.to(device)
    else:
        tcfg = get_mimicdet_cfg(config_file, opts)
        tcfg.MODEL.DEVICE = device
        if tcfg.MODEL.META_ARCHITECTURE == "Distiller":
            raise ValueError(f"The teacher config {config_file} is itself a distiller")
        tcfg.freeze()
        model = build_model(tcfg)
    if weights:
        load_teacher_weights(model, weights)
    elif allow_random:
        logger.warning("The teacher keeps its random initialisation (TEACHER.ALLOW_RANDOM True)")
    else:
        raise ValueError(
            "MODEL.DISTILL.TEACHER.WEIGHTS is empty: distilling a random teacher teaches noise "
            "(set TEACHER.ALLOW_RANDOM True only for a smoke run)"
        )
    return FrozenTeacher(model)


def distiller_arguments(distill_cfg) -> Dict:
    """
    The :class:`Distiller` arguments other than the student and the teacher, from a
    ``MODEL.DISTILL`` node: what a LazyConfig passes to ``L(Distiller)`` beside its models.
    """
    return {
        "features": list(distill_cfg.FEATURES),
        "adapter_kernel": distill_cfg.ADAPTER_KERNEL,
        "warmup_iters": distill_cfg.WARMUP_ITERS,
        "weights": {
            "fgfi": distill_cfg.FGFI.WEIGHT,
            "defeat_fg": distill_cfg.DEFEAT.FG_WEIGHT,
            "defeat_bg": distill_cfg.DEFEAT.BG_WEIGHT,
            "rank": distill_cfg.RANK.WEIGHT,
            "pfi": distill_cfg.PFI.WEIGHT,
        },
        "fgfi_psi": distill_cfg.FGFI.PSI,
        "gt_level_scale": distill_cfg.GT_LEVEL_SCALE,
        "rank_two_stage_scores": distill_cfg.RANK.TWO_STAGE_SCORES,
        "rank_score": distill_cfg.RANK.SCORE,
        "pfi_prediction_gap": distill_cfg.PFI.PREDICTION_GAP,
    }


@META_ARCH_REGISTRY.register()
class Distiller(nn.Module):
    """
    Trains ``student`` (any detectron2 detector with a ``backbone``: RetinaNet, FCOS, Faster
    R-CNN, MimicDet) with its own losses plus the KD terms whose weights are non-zero:
    ``loss_kd_fgfi``, ``loss_kd_defeat_fg``, ``loss_kd_defeat_bg`` (feature imitation, any
    student), ``loss_kd_rank``, ``loss_kd_pfi`` (dense students: they compare class logits). The
    student's training forward is its own; forward hooks keep its pyramid (and dense logits) for
    the KD terms. The teacher runs once per step under ``no_grad`` on the same augmented batch
    with its own pixel mean/std.

    The teacher is held outside the module tree: it is not in ``state_dict`` (no checkpoint,
    ``MODEL.WEIGHTS`` included, can overwrite it, and a checkpoint holds the student and the
    adapters only), not in ``parameters()`` (the optimizer and DDP never see it), and
    ``train()`` does not reach it. Inference is the student's alone.
    """

    @configurable
    def __init__(
        self,
        *,
        student: nn.Module,
        teacher: Optional[FrozenTeacher],
        features: List[str],
        adapter_kernel: int,
        warmup_iters: int,
        weights: Dict[str, float],
        fgfi_psi: float,
        gt_level_scale: float = 56.0,
        rank_two_stage_scores: str = "roi_head",
        rank_score: str = "probability",
        pfi_prediction_gap: str = "logit",
    ):
        """
        Args:
            student: the detector being trained, built from its own meta-architecture.
            teacher: the frozen teacher (:func:`build_teacher`); None builds the distiller for
                evaluation only (``train_net.py --eval-only``): inference is the student's, and
                training is refused.
            features: names of the FPN levels imitated (the student's and the teacher's).
            adapter_kernel: kernel of the per-level adaptation conv (student -> teacher width).
            warmup_iters: iterations before the KD terms count.
            weights: per KD term, its multiplier; a term with weight 0 is not computed.
            fgfi_psi: FGFI's threshold factor (:func:`fgfi_masks`).
            gt_level_scale: the level rule of FGFI's and DeFeat's masks (:func:`gt_levels`).
            rank_two_stage_scores: a two-stage teacher's class scores for Rank Mimicking
                (:func:`dense_view`).
            rank_score: what Rank Mimicking's softmax ranks by, probabilities or logits
                (:func:`rank_mimic_loss`).
            pfi_prediction_gap: what PFI's weight compares, logits or probabilities
                (:func:`pfi_loss`).
        """
        super().__init__()
        if not isinstance(getattr(student, "backbone", None), Backbone):
            raise ValueError(
                f"The student must be a detectron2 detector with a `backbone` (RetinaNet, FCOS, "
                f"Faster R-CNN, MimicDet), got {type(student).__name__}"
            )
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # not a submodule: see the class docstring
        self.features = list(features)
        self.warmup_iters = warmup_iters
        self.weights = {k: v for k, v in weights.items() if v > 0}
        self.fgfi_psi = fgfi_psi
        self.gt_level_scale = gt_level_scale
        self.rank_two_stage_scores = rank_two_stage_scores
        check_rank_score(rank_score)  # refused before any training
        self.rank_score = rank_score
        check_pfi_prediction_gap(pfi_prediction_gap)  # refused before any training
        self.pfi_prediction_gap = pfi_prediction_gap
        self.kd_adapters = nn.ModuleDict()
        if teacher is None:
            self.teacher_dense = None
            self.register_load_state_dict_post_hook(_ignore_adapters)
            logger.info(
                f"Distiller without its teacher: evaluation of the {type(student).__name__}"
            )
            return
        self.student_anchors = anchor_generator_of(student)
        self.teacher_dense = self._check_compatible()
        # the anchor level of each imitated feature, for the terms that read anchors or logits
        self.anchor_levels = []
        if self.weights.keys() & {"fgfi", "rank", "pfi"}:
            self.anchor_levels = [self.student_anchors[0].index(f) for f in self.features]

        # adapters only when a feature-imitation term is on (an unused one would stall DDP)
        if self.weights.keys() & {"fgfi", "defeat_fg", "defeat_bg", "pfi"}:
            s_shapes = student.backbone.output_shape()
            t_shapes = teacher.model.backbone.output_shape()
            for f in self.features:
                self.kd_adapters[f] = nn.Conv2d(
                    s_shapes[f].channels,
                    t_shapes[f].channels,
                    adapter_kernel,
                    padding=adapter_kernel // 2,
                )
            self.kd_adapters.to(student.device)
        num_params = sum(p.numel() for p in teacher.parameters())
        logger.info(
            f"Distilling {type(student).__name__} from a {type(teacher.model).__name__} teacher "
            f"({num_params / 1e6:.2f} M parameters) with {sorted(self.weights) or 'no KD term'}"
        )

    @classmethod
    def from_config(cls, cfg, with_teacher: bool = True):
        """``with_teacher=False``: for evaluation only, see ``teacher`` in ``__init__``."""
        dcfg = cfg.MODEL.DISTILL
        if dcfg.STUDENT_META_ARCHITECTURE == "Distiller":
            raise ValueError(
                "MODEL.DISTILL.STUDENT_META_ARCHITECTURE is the student's own meta-architecture "
                '(e.g. "RetinaNet"), not "Distiller"'
            )
        student_cfg = cfg.clone()
        student_cfg.defrost()
        student_cfg.MODEL.META_ARCHITECTURE = dcfg.STUDENT_META_ARCHITECTURE
        student_cfg.freeze()
        tcfg = dcfg.TEACHER
        return {
            "student": build_model(student_cfg),
            "teacher": (
                build_teacher(
                    tcfg.CONFIG_FILE,
                    tcfg.WEIGHTS,
                    cfg.MODEL.DEVICE,
                    tcfg.ALLOW_RANDOM,
                    tcfg.OPTS,
                )
                if with_teacher
                else None
            ),
            **distiller_arguments(dcfg),
        }

    def _check_compatible(self) -> Optional[DenseView]:
        """
        Clear errors at construction for what would otherwise fail (or mislead) mid-training.
        Returns the teacher's dense predictions when a term compares class logits.
        """
        student, teacher = self.student, self.teacher.model
        for name, model in (("student", student), ("teacher", teacher)):
            missing = set(self.features) - set(model.backbone.output_shape())
            if missing:
                raise ValueError(
                    f"MODEL.DISTILL.FEATURES {self.features}: the {name} "
                    f"({type(model).__name__}) has no feature {sorted(missing)}"
                )
        if self.weights.keys() & {"fgfi", "defeat_fg", "defeat_bg"}:
            shapes = student.backbone.output_shape()
            strides = [shapes[f].stride for f in self.features]
            if any(coarser != 2 * finer for finer, coarser in zip(strides, strides[1:])):
                raise ValueError(
                    f"MODEL.DISTILL.FEATURES {self.features} (strides {strides}): FGFI's and "
                    "DeFeat's masks count a GT's level from the first feature, one level a stride "
                    "doubling: list consecutive levels, finest first"
                )
        if self.weights.keys() & {"fgfi", "rank", "pfi"}:
            if self.student_anchors is None:
                raise ValueError(
                    f"FGFI, Rank Mimicking and PFI read the student's anchors: "
                    f"{type(student).__name__} has none (RetinaNet, FCOS, Faster R-CNN's RPN and "
                    "MimicDet's refinement do)"
                )
            levels = self.student_anchors[0]
            if not set(self.features) <= set(levels):
                raise ValueError(
                    f"FGFI, Rank Mimicking and PFI read the student's anchors at "
                    f"MODEL.DISTILL.FEATURES {self.features}, which must be among its anchor "
                    f"levels {levels}"
                )
        if not self.weights.keys() & {"rank", "pfi"}:
            return None
        if not (isinstance(student, DenseDetector) and isinstance(student.head, nn.Module)):
            raise ValueError(
                "Rank Mimicking and PFI compare the student's dense class logits with the "
                f"teacher's: the student must be a dense detector (RetinaNet, FCOS), got "
                f"{type(student).__name__}"
            )
        # the teacher's second stage is read (and checked) only for Rank Mimicking
        scores = self.rank_two_stage_scores if "rank" in self.weights else None
        view = dense_view(teacher, student.num_classes, scores)
        if view.in_features != list(student.head_in_features) or not same_anchors(
            view.anchor_generator, student.anchor_generator
        ):
            raise ValueError(
                "Rank Mimicking and PFI compare the teacher's class logit of each student "
                f"anchor: the teacher's dense predictions ({type(teacher).__name__} on "
                f"{view.in_features}) must use the student's levels "
                f"{list(student.head_in_features)} and the same anchors (ANCHOR_GENERATOR)"
            )
        return view

    @property
    def device(self):
        return self.student.device

    def _apply(self, fn, *args, **kwargs):
        # .to(device), .half(), ... reach the teacher too, though it is not a submodule: a
        # LazyConfig builds it on the CPU and train_net moves the whole model
        if self.teacher is not None:
            self.teacher.model._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def forward(self, batched_inputs: List[Dict[str, Tensor]]):
        """As the student's ``forward``; in training its losses plus the KD terms."""
        if not self.training:
            return self.student(batched_inputs)
        if self.teacher is None:
            raise RuntimeError(
                "This Distiller was built without its teacher, for evaluation only "
                "(Distiller(cfg, with_teacher=False)); build it with its teacher to train"
            )
        student = self.student
        # the student trains exactly as alone; its backbone's input and output (and its dense
        # head's output, for the terms that compare logits) are kept on the way
        seen = {}
        hooks = [student.backbone.register_forward_hook(_keep_once(seen, "backbone"))]
        if self.teacher_dense is not None:
            hooks.append(student.head.register_forward_hook(_keep_once(seen, "head")))
        try:
            losses = student(batched_inputs)
        finally:
            for hook in hooks:
                hook.remove()
        if self.weights:
            gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
            (images,), features = seen["backbone"]
            predictions = seen["head"][1] if "head" in seen else None
            losses.update(
                self.kd_losses(batched_inputs, images, features, predictions, gt_instances)
            )
        return losses

    def kd_losses(self, batched_inputs, images, features, predictions, gt_instances):
        """
        The enabled KD terms, each times its weight (and 0 during the warm-up).

        Args:
            batched_inputs: the training batch (the teacher preprocesses it its own way).
            images: ``(N, 3, H, W)`` the student's padded, normalised images.
            features: the student's pyramid (its backbone's output).
            predictions: the student's dense head's output, when a term compares logits.
            gt_instances: per image, the GT ``Instances`` on the model's device.
        """
        teacher = self.teacher.model
        with torch.no_grad():
            t_images = teacher.preprocess_image(batched_inputs)
            if t_images.tensor.shape != images.shape:
                raise ValueError(
                    f"Teacher and student see images of shapes {tuple(t_images.tensor.shape)} "
                    f"and {tuple(images.shape)}: give both the same SIZE_DIVISIBILITY / padding"
                )
            t_features = teacher.backbone(t_images.tensor)
            t_logits = None
            if self.teacher_dense is not None:
                t_logits = self.teacher_dense.class_logits(t_features)
        levels = self.anchor_levels
        s_logits = predictions[0] if predictions is not None else None
        grids = [tuple(features[f].shape[-2:]) for f in self.features]
        # the student's anchors on every level of its anchor generator, once for FGFI and RM
        anchors = None
        if self.weights.keys() & {"fgfi", "rank"}:
            level_names, generator = self.student_anchors
            anchors = generator([features[f] for f in level_names])

        adapted = [self.kd_adapters[f](features[f]) for f in self.kd_adapters]
        t_feats = [t_features[f] for f in self.kd_adapters]
        for f, s, t in zip(self.kd_adapters, adapted, t_feats):
            if s.shape != t.shape:
                raise ValueError(
                    f"Feature {f}: student {tuple(s.shape)} vs teacher {tuple(t.shape)}"
                )

        losses = {}
        if "fgfi" in self.weights:
            per_image = [
                fgfi_masks(
                    [anchors[i].tensor for i in levels],
                    grids,
                    gt.gt_boxes.tensor,
                    self.fgfi_psi,
                    self.gt_level_scale,
                )
                for gt in gt_instances
            ]
            masks = [torch.stack(level) for level in zip(*per_image)]
            losses["loss_kd_fgfi"] = fgfi_loss(adapted, t_feats, masks)
        if self.weights.keys() & {"defeat_fg", "defeat_bg"}:
            shapes = self.student.backbone.output_shape()
            strides = [shapes[f].stride for f in self.features]
            per_image = [
                defeat_foreground_masks(gt.gt_boxes.tensor, grids, strides, self.gt_level_scale)
                for gt in gt_instances
            ]
            fg_masks = [torch.stack(level) for level in zip(*per_image)]
            fg, bg = defeat_losses(adapted, t_feats, fg_masks)
            losses.update({"loss_kd_defeat_fg": fg, "loss_kd_defeat_bg": bg})
        if "pfi" in self.weights:
            comparable = self.teacher_dense.comparable_student_logits
            losses["loss_kd_pfi"] = pfi_loss(
                adapted,
                t_feats,
                [comparable(s_logits[i]) for i in levels],
                [t_logits[i] for i in levels],
                self.pfi_prediction_gap,
            )
        if "rank" in self.weights:
            losses["loss_kd_rank"] = self._rank_loss(
                anchors, s_logits, t_features, t_logits, t_images.image_sizes, gt_instances
            )

        scale = 0.0 if get_event_storage().iter < self.warmup_iters else 1.0
        # "loss_kd_<term>" is weighted by weights["<term>"]; DeFeat computes both halves, one may
        # be off (weight 0)
        prefix = len("loss_kd_")
        return {k: v * self.weights.get(k[prefix:], 0.0) * scale for k, v in losses.items()}

    def _rank_loss(
        self, anchors, s_logits, t_features, t_logits, image_sizes, gt_instances
    ) -> Tensor:
        """Rank Mimicking over the teacher's positives of each GT, at the GT's class."""
        targets = rank_targets(
            self.teacher_dense, t_features, t_logits, anchors, gt_instances, image_sizes
        )
        s_flat = per_anchor_logits(s_logits, self.student.num_classes)
        if not targets:
            return s_flat.sum() * 0.0
        return rank_mimic_loss(
            [t_scores for *_, t_scores in targets],
            [s_flat[i, idx, cls] for i, idx, cls, _ in targets],
            self.rank_score,
        )


def _ignore_adapters(model: Distiller, incompatible_keys):
    """
    A distiller built for evaluation has no adapters (training only): loading a trained
    checkpoint skips its ``kd_adapters.*`` with one line instead of a list of unexpected keys.
    A checkpoint without the student's tensors would evaluate a random student: refused.
    """
    missing = [k for k in incompatible_keys.missing_keys if k.startswith("student.")]
    if missing:
        raise ValueError(
            f"The checkpoint has no {missing[0]} (and {len(missing) - 1} more student.* tensors): "
            "a distiller evaluates a distiller's checkpoint; evaluate a student-only (deploy) "
            "checkpoint with the student's own config"
        )
    adapters = [k for k in incompatible_keys.unexpected_keys if k.startswith("kd_adapters.")]
    for k in adapters:
        incompatible_keys.unexpected_keys.remove(k)
    if adapters:
        logger.info(f"Skipped the {len(adapters)} adapter tensors: training only, not evaluated")


def _keep_once(seen: Dict, name: str):
    """A forward hook that keeps a module's ``(inputs, output)`` in ``seen[name]``, once."""

    def hook(module, inputs, output):
        if name in seen:
            raise RuntimeError(
                f"The student ran its {name} twice in one training step; the distiller reads "
                "the one run that trains it"
            )
        seen[name] = (inputs, output)

    return hook
