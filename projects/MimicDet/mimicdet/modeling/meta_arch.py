"""MimicDet: a one-stage detector whose dense S-head mimics a training-only two-stage T-head."""

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from detectron2.config import configurable
from detectron2.layers import batched_nms, cat, nonzero_tuple
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_roi_heads
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from ..checkpoint import WeightsOnlyCheckpointer
from .mimic_loss import DualPathMimicLoss, sample_mimic_boxes
from .refinement import RefinementModule
from .s_head import SHead

__all__ = ["MimicDet"]

# the heads whose predictions MimicDet.mixed_inference combines
HEADS = ("s_head", "t_head")

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class MimicDet(DenseDetector):
    """
    Training: staggered pyramid P2..P7 -> refinement (P3..P7) -> refined boxes -> S-head (dense,
    P3..P7) and T-head (sampled boxes, pooled one level finer) -> refinement, S-head, T-head and
    mimic losses. Inference: P3..P7 -> refinement -> top refined boxes -> S-head; the T-head and
    P2 never run.

    ``forward`` is :class:`DenseDetector`'s flow with two heads in sequence instead of one, so
    the base's ``head`` is unused; preprocessing, the loss-normaliser EMA and the dense
    transposes come from the base.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        refinement: RefinementModule,
        s_head: SHead,
        t_head: Optional[nn.Module],
        t_backbone: Optional[Backbone] = None,
        t_head_frozen: bool = False,
        head_in_features: List[str],
        num_classes: int,
        mimic_paths: Sequence[str],
        mimic_per_image: int,
        detach_teacher: bool,
        loss_weights: Dict[str, float],
        score_with_objectness: bool = False,
        test_score_thresh: float,
        test_nms_thresh: float,
        max_detections_per_image: int,
        pixel_mean,
        pixel_std,
    ):
        """
        Args:
            backbone: a pyramid returning ``head_in_features`` (and the T-head's finer level in
                training), e.g. :class:`StaggeredFPN`.
            refinement, s_head: the dense modules on ``head_in_features``.
            t_head: the T-head (:class:`MimicTHead`), or None to train the S-head alone.
            t_backbone: None (the paper) pools the T-head from ``backbone``; a second pyramid
                gives the T-head a backbone of its own (the "separated backbone" ablation).
            t_head_frozen: ``t_head`` and ``t_backbone`` are a trained, fixed teacher: they get
                no gradient and no T-head loss, and their batch norms stay in eval mode.
            head_in_features: the dense levels, e.g. ``["p3", ..., "p7"]``.
            num_classes: foreground classes ``C``.
            mimic_paths: subset of ``("cls", "reg")`` to mimic; empty turns mimicking off.
            mimic_per_image: size of B_m per image.
            detach_teacher: stop the mimic gradient at the T-head.
            loss_weights: multiplier per loss name; missing names weigh 1.
            score_with_objectness: score a detection by the geometric mean of the S-head's class
                probability and the refinement's objectness instead of the former alone.
            test_score_thresh, test_nms_thresh, max_detections_per_image: inference filtering.
            pixel_mean, pixel_std: see :class:`DenseDetector`.
        """
        super().__init__(
            backbone, None, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std
        )
        assert t_head is not None or not mimic_paths, "mimicking needs the T-head"
        assert t_backbone is not None or not t_head_frozen, "only a separate T-head is frozen"
        self.refinement = refinement
        self.s_head = s_head
        self.roi_heads = t_head
        self.t_backbone = t_backbone
        self.t_head_frozen = t_head_frozen
        # how WeightsOnlyCheckpointer treats the separated T-head: a frozen one keeps the
        # weights it was built with; a joint one's pyramid starts as a copy of the loaded shared
        # one when the checkpoint has none (ImageNet or MODEL.WEIGHTS: the same initialisation)
        joint = t_backbone is not None and not t_head_frozen
        self.checkpoint_skips = ("t_backbone", "roi_heads") if t_head_frozen else ()
        self.checkpoint_copies = {"t_backbone": "backbone"} if joint else {}
        if t_head_frozen:
            t_backbone.requires_grad_(False)
            t_head.requires_grad_(False)
        self.num_classes = num_classes
        self.mimic_loss = DualPathMimicLoss(mimic_paths, detach_teacher) if mimic_paths else None
        self.mimic_per_image = mimic_per_image
        self.loss_weights = dict(loss_weights)
        self.score_with_objectness = score_with_objectness
        self.test_score_thresh = test_score_thresh
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image
        self.register_load_state_dict_post_hook(_explain_absent_training_only_weights)
        if t_backbone is None:
            _check_training_levels(backbone, t_head, head_in_features)
        else:
            _check_training_levels(backbone, None, head_in_features)
            _check_training_levels(t_backbone, t_head, head_in_features)
        if t_head is not None and t_head.level_assigner != refinement.level_assigner:
            # the T-head levels its appended GT boxes as the refinement levels the GTs
            raise ValueError(
                f"The T-head's level rule {t_head.level_assigner} is not the refinement's "
                f"{refinement.level_assigner}"
            )

    @classmethod
    def from_config(cls, cfg):
        mcfg = cfg.MODEL.MIMICDET
        backbone, t_backbone, t_head, frozen = _build_backbones_and_t_head(cfg)
        shapes = backbone.output_shape()
        dense_shapes = [shapes[f] for f in mcfg.REFINE.IN_FEATURES]
        weights = mcfg.LOSS_WEIGHTS
        return {
            "backbone": backbone,
            "refinement": RefinementModule(cfg, dense_shapes),
            "s_head": SHead(cfg, dense_shapes),
            "t_head": t_head,
            "t_backbone": t_backbone,
            "t_head_frozen": frozen,
            "head_in_features": mcfg.REFINE.IN_FEATURES,
            "num_classes": cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            "mimic_paths": mcfg.MIMIC.PATHS if mcfg.MIMIC.ENABLED else [],
            "mimic_per_image": mcfg.MIMIC.NUM_PER_IMAGE,
            "detach_teacher": mcfg.MIMIC.DETACH_TEACHER,
            "loss_weights": {
                "loss_refine_cls": weights.REFINE_CLS,
                "loss_refine_box": weights.REFINE_BOX,
                "loss_s_cls": weights.S_CLS,
                "loss_s_box": weights.S_BOX,
                "loss_t_cls": weights.T_CLS,
                "loss_t_box": weights.T_BOX,
                "loss_mimic_cls": weights.MIMIC_CLS,
                "loss_mimic_reg": weights.MIMIC_REG,
            },
            "score_with_objectness": mcfg.S_HEAD.SCORE_WITH_OBJECTNESS,
            "test_score_thresh": mcfg.S_HEAD.SCORE_THRESH_TEST,
            "test_nms_thresh": mcfg.S_HEAD.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    def forward(self, batched_inputs: List[Dict[str, Tensor]]):
        """
        Args:
            batched_inputs: as :class:`DenseDetector`; ``instances`` is needed in training.

        Returns:
            training: dict of losses; inference: per image ``{"instances": Instances}`` with
            ``pred_boxes``, ``scores``, ``pred_classes`` at the requested output size.
        """
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        if self.training:
            assert "instances" in batched_inputs[0], "Instance annotations are missing in training!"
            gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
            return self.forward_training(images, features, gt_instances)

        results = self.forward_inference(images, features)
        return self._postprocess(results, batched_inputs, images.image_sizes)

    @torch.no_grad()
    def teacher_inference(self, batched_inputs: List[Dict[str, Tensor]]):
        """
        Detections of the T-head run as a two-stage detector on the refined boxes that the
        S-head scores, with the S-head's post-processing: the gap to :meth:`forward` is what
        mimicking has left to transfer (``tools/evaluate_teacher.py``). Needs the training-only
        modules, i.e. a full checkpoint, not a deploy one.

        Returns:
            as :meth:`forward` at inference.
        """
        return self.mixed_inference(batched_inputs, classes_from="t_head", boxes_from="t_head")

    def mixed_inference(
        self, batched_inputs: List[Dict[str, Tensor]], classes_from: str, boxes_from: str
    ):
        """
        Detections on the top refined boxes, the class scores from the head ``classes_from``
        names and the boxes from the head ``boxes_from`` names (``"s_head"`` or ``"t_head"``
        each), with the S-head's post-processing. ``("t_head", "t_head")`` is
        :meth:`teacher_inference`, ``("s_head", "s_head")`` the deployed detector's own
        detections; the two mixes split the gap between the heads into what the S-head's
        classification and its localization lose (``tools/evaluate_teacher.py --mixed``). Each
        head's deltas are decoded with its own box transform.

        Returns:
            as :meth:`forward` at inference.
        """
        heads = {classes_from, boxes_from}
        if not heads <= set(HEADS):
            raise ValueError(
                f"classes_from and boxes_from each name one of {HEADS}; got {classes_from!r}, "
                f"{boxes_from!r}"
            )
        if "t_head" in heads and self.roi_heads is None:
            raise RuntimeError(
                "the T-head's predictions need the T-head, but this model has none "
                "(MODEL.MIMICDET.T_HEAD.ENABLED is False)"
            )
        if self.training:
            raise RuntimeError("mixed_inference runs at inference only: call model.eval() first")
        images = self.preprocess_image(batched_inputs)
        t_features = self._t_head_features(images) if "t_head" in heads else None
        if t_features is not None and self.t_backbone is None:
            features = t_features  # the shared pyramid: its P3..P7 are the S-head's
        else:
            features = self.backbone(images.tensor)
        refined, anchor_levels, delta_maps = self._top_refined_boxes(features, images.image_sizes)
        # per head and image: the decoded boxes and the foreground class probabilities
        predictions = {}
        if "s_head" in heads:
            s_outputs = self._s_head_at_refined(features, refined, anchor_levels, delta_maps)
            predictions["s_head"] = [
                self.s_head.predict(r.proposal_boxes.tensor, logits, deltas)
                for r, (logits, deltas) in zip(refined, s_outputs)
            ]
        if "t_head" in heads:
            predictions["t_head"] = self.roi_heads.predict(t_features, refined)
        results = [
            self._select_detections(r, boxes, scores)
            for r, (boxes, _), (_, scores) in zip(
                refined, predictions[boxes_from], predictions[classes_from]
            )
        ]
        return self._postprocess(results, batched_inputs, images.image_sizes)

    def _t_head_features(self, images: ImageList) -> Dict[str, Tensor]:
        """The T-head's pyramid (the shared one, or its own), with its training-only finer
        level, computed without training anything."""
        # the pyramid builds the T-head's finer level only in training mode; batch norms stay
        # in eval mode so that no running statistic moves and no batch statistic is used
        t_backbone = self.t_backbone if self.t_backbone is not None else self.backbone
        t_backbone.train()
        for m in t_backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        try:
            return t_backbone(images.tensor)
        finally:
            t_backbone.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.t_head_frozen:
            # a fixed teacher: its batch statistics never move (its pyramid stays in training
            # mode otherwise, for the staggered level only training computes)
            for module in (self.t_backbone, self.roi_heads):
                for m in module.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def _postprocess(self, results, batched_inputs, image_sizes):
        processed = []
        for result, inputs, image_size in zip(results, batched_inputs, image_sizes):
            height = inputs.get("height", image_size[0])
            width = inputs.get("width", image_size[1])
            processed.append({"instances": detector_postprocess(result, height, width)})
        return processed

    def _dense_forward(self, features: Dict[str, Tensor]):
        """
        Returns:
            anchors ``(R, 4)``, anchor levels ``(R,)``, and the dense predictions flattened over
            levels: objectness ``(N, R)``, refinement deltas ``(N, R, 4)``, S-head logits
            ``(N, R, C + 1)``, S-head deltas ``(N, R, 4)`` and per-level S-head regression
            features ``(N, D, Hi, Wi)``.
        """
        dense = [features[f] for f in self.head_in_features]
        anchors, anchor_levels = self.refinement.anchors(dense)
        objectness, refine_deltas = self.refinement(dense)
        s_logits, s_deltas, s_reg_feats = self.s_head(dense, refine_deltas)
        flat = self._transpose_dense_predictions(
            [objectness, refine_deltas, s_logits, s_deltas], [1, 4, self.num_classes + 1, 4]
        )
        objectness, refine_deltas, s_logits, s_deltas = [cat(x, dim=1) for x in flat]
        return (
            anchors,
            anchor_levels,
            objectness.squeeze(2),
            refine_deltas,
            s_logits,
            s_deltas,
            s_reg_feats,
        )

    def forward_training(
        self, images: ImageList, features: Dict[str, Tensor], gt_instances: List[Instances]
    ) -> Dict[str, Tensor]:
        anchors, anchor_levels, objectness, refine_deltas, s_logits, s_deltas, s_reg_feats = (
            self._dense_forward(features)
        )
        gt_labels, gt_boxes = self.refinement.label_anchors(anchors, anchor_levels, gt_instances)
        num_pos = mean_over_workers((gt_labels == 1).sum().float()).item()
        storage = get_event_storage()
        storage.put_scalar("refine/num_pos_anchors", num_pos / len(gt_instances))
        # per level, on this worker: a level with none never trains its positives
        levels = self.refinement.levels
        pos_levels = anchor_levels[nonzero_tuple(gt_labels == 1)[1]] - levels[0]
        for level, n in zip(levels, torch.bincount(pos_levels, minlength=len(levels)).tolist()):
            storage.put_scalar(f"refine/num_pos_anchors_p{level}", n / len(gt_instances))
        # positives per batch vary a lot; RetinaNet's EMA keeps the normaliser stable, and the
        # mean over workers gives every worker the same normaliser (the losses are then averaged
        # by DDP's gradient all-reduce as if computed on the whole batch)
        normalizer = self._ema_update("refine_loss_normalizer", max(num_pos, 1), 100)
        losses = self.refinement.losses(
            anchors, objectness, refine_deltas, gt_labels, gt_boxes, normalizer
        )

        refined = self.refinement.refined_boxes(
            anchors, anchor_levels, objectness, refine_deltas, images.image_sizes
        )
        losses.update(self.s_head.losses(refined, s_logits, s_deltas, gt_instances))

        if self.roi_heads is not None:
            t_features = features
            if self.t_backbone is not None:
                with torch.set_grad_enabled(not self.t_head_frozen):
                    t_features = self.t_backbone(images.tensor)
            sampled, t_losses = self.roi_heads(images, t_features, refined, gt_instances)
            if not self.t_head_frozen:
                if self.t_backbone is not None:
                    t_losses = _touch_unpooled_levels(t_losses, t_features, self.roi_heads)
                losses.update(t_losses)
            if self.mimic_loss is not None:
                # flattened like the other dense outputs, so anchor_index addresses it
                reg_dim = s_reg_feats[0].shape[1]
                reg_feats = cat(self._transpose_dense_predictions([s_reg_feats], [reg_dim])[0], 1)
                losses.update(
                    self.mimic_loss(
                        sample_mimic_boxes(sampled, self.mimic_per_image),
                        s_logits,
                        reg_feats,
                    )
                )
        return {k: v * self.loss_weights.get(k, 1.0) for k, v in losses.items()}

    def _top_refined_boxes(self, features: Dict[str, Tensor], image_sizes):
        """
        The refinement alone, run densely, and its top refined boxes per image (inference).

        Returns:
            the refined boxes per image (:meth:`RefinementModule.refined_boxes`), the anchor
            levels ``(R,)`` and the per-level refinement deltas ``(N, 4, Hi, Wi)`` that guide
            the S-head.
        """
        dense = [features[f] for f in self.head_in_features]
        anchors, anchor_levels = self.refinement.anchors(dense)
        objectness_maps, delta_maps = self.refinement(dense)
        objectness, refine_deltas = [
            cat(x, dim=1)
            for x in self._transpose_dense_predictions([objectness_maps, delta_maps], [1, 4])
        ]
        refined = self.refinement.refined_boxes(
            anchors, anchor_levels, objectness.squeeze(2), refine_deltas, image_sizes
        )
        return refined, anchor_levels, delta_maps

    def forward_inference(self, images: ImageList, features: Dict[str, Tensor]) -> List[Instances]:
        refined, anchor_levels, delta_maps = self._top_refined_boxes(features, images.image_sizes)
        s_outputs = self._s_head_at_refined(features, refined, anchor_levels, delta_maps)
        return [
            self.inference_single_image(r, logits, deltas)
            for r, (logits, deltas) in zip(refined, s_outputs)
        ]

    def _s_head_at_refined(
        self, features: Dict[str, Tensor], refined: List[Instances], anchor_levels, delta_maps
    ) -> List[Tuple[Tensor, Tensor]]:
        """Per image, the S-head's class logits ``(Ki, C + 1)`` and deltas ``(Ki, 4)`` at its top
        refined boxes' anchor locations (:meth:`_top_refined_boxes`)."""
        # The refinement runs densely; the S-head only where its output is read, at the top
        # refined boxes' locations (the same values as the dense S-head there, see tests).
        dense = [features[f] for f in self.head_in_features]
        positions, order, image = _level_positions(
            refined, anchor_levels, dense, self.refinement.levels
        )
        s_logits, s_deltas = self.s_head.forward_at(dense, delta_maps, positions)
        # back to the refined boxes' order; sizes stay tensors so that a trace keeps them dynamic
        s_logits, s_deltas = s_logits[order], s_deltas[order]
        return [(s_logits[image == i], s_deltas[image == i]) for i in range(len(refined))]

    def inference_single_image(
        self, refined: Instances, pred_logits: Tensor, pred_deltas: Tensor
    ) -> Instances:
        """
        Args:
            refined: the image's top refined boxes (``proposal_boxes``), K of them.
            pred_logits: ``(K, C + 1)``; pred_deltas: ``(K, 4)``, the S-head at their locations.
        """
        boxes, scores = self.s_head.predict(refined.proposal_boxes.tensor, pred_logits, pred_deltas)
        return self._select_detections(refined, boxes, scores)

    def _select_detections(self, refined: Instances, boxes: Tensor, scores: Tensor) -> Instances:
        """The test-time selection: ``boxes`` ``(K, 4)`` and class probabilities ``(K, C)``
        predicted for the K refined boxes, to the kept detections."""
        if self.score_with_objectness:
            scores = (scores * refined.objectness_logits.sigmoid()[:, None]).sqrt()
        boxes = Boxes(boxes)
        boxes.clip(refined.image_size)
        box_idx, classes = (scores > self.test_score_thresh).nonzero(as_tuple=True)
        boxes, scores = boxes[box_idx], scores[box_idx, classes]
        keep = batched_nms(boxes.tensor, scores, classes, self.test_nms_thresh)
        keep = keep[: self.max_detections_per_image]
        return Instances(
            refined.image_size,
            pred_boxes=boxes[keep],
            scores=scores[keep],
            pred_classes=classes[keep],
        )


def _level_positions(
    refined: List[Instances], anchor_levels: Tensor, features: List[Tensor], levels: List[int]
) -> Tuple[List[Tensor], Tensor, Tensor]:
    """
    The ``(image, row, col)`` of every refined box's anchor, grouped by pyramid level (one
    anchor per location, flattened level by level, row-major, as the dense predictions); the
    permutation that puts level-grouped rows back in the boxes' order (images concatenated);
    and each box's image in that order.
    """
    sizes = [f.shape[2] * f.shape[3] for f in features]
    assert len(anchor_levels) == sum(sizes), "the S-head reads one anchor per location"
    level_start = torch.tensor([0] + sizes[:-1], device=anchor_levels.device).cumsum(0)
    index = cat([r.anchor_index for r in refined])
    image = cat([torch.full_like(r.anchor_index, i) for i, r in enumerate(refined)])
    level = anchor_levels[index]
    positions, grouped = [], []
    for i, feature in enumerate(features):
        rows = nonzero_tuple(level == levels[i])[0]
        within = index[rows] - level_start[i]
        width = feature.shape[3]
        positions.append(torch.stack([image[rows], within // width, within % width], dim=1))
        grouped.append(rows)
    # the inverse permutation, as a tensor op (len() would be a constant in a trace)
    return positions, torch.argsort(cat(grouped)), image


def _build_backbones_and_t_head(cfg):
    """
    The shared backbone, and by ``MODEL.MIMICDET.T_HEAD.BACKBONE`` the T-head's own pyramid (or
    None), the T-head (or None) and whether the T-head is frozen.
    """
    mcfg = cfg.MODEL.MIMICDET
    mode = mcfg.T_HEAD.BACKBONE
    modes = ("shared", "separate_joint", "separate_frozen")
    if mode not in modes:
        raise ValueError(f"MODEL.MIMICDET.T_HEAD.BACKBONE is {mode!r}; choose one of {modes}")
    if mode != "shared" and not mcfg.T_HEAD.ENABLED:
        raise ValueError(
            f'MODEL.MIMICDET.T_HEAD.BACKBONE "{mode}" puts the T-head on its own pyramid, but '
            "T_HEAD.ENABLED is False: there is no T-head"
        )
    if mode == "shared" or not mcfg.T_HEAD.ENABLED:
        backbone = build_backbone(cfg)
        t_head = build_roi_heads(cfg, backbone.output_shape()) if mcfg.T_HEAD.ENABLED else None
        return backbone, None, t_head, False
    # the T-head's pyramid is built as the shared one would be for it (the finest level in
    # training when staggered); the S-side one as with no T-head (nothing reads its finest level)
    t_backbone = build_backbone(cfg)
    s_cfg = cfg.clone()
    s_cfg.defrost()
    s_cfg.MODEL.MIMICDET.T_HEAD.ENABLED = False
    backbone = build_backbone(s_cfg)
    t_head = build_roi_heads(cfg, t_backbone.output_shape())
    if mode == "separate_joint":
        # the same initialisation: only the training that follows tells the two apart (a
        # checkpoint loaded later copies again: MimicDet.checkpoint_copies)
        t_backbone.load_state_dict(backbone.state_dict())
        return backbone, t_backbone, t_head, False
    _load_frozen_t_head(mcfg.T_HEAD.FROZEN_WEIGHTS, t_backbone, t_head)
    return backbone, t_backbone, t_head, True


def _load_frozen_t_head(path: str, t_backbone: Backbone, t_head: nn.Module):
    """
    Load a trained MimicDet's T-head (``roi_heads.*``) and the pyramid it pooled from
    (``t_backbone.*`` when it had its own, else ``backbone.*``) strictly, or say why not.
    """
    if not path:
        raise ValueError(
            'MODEL.MIMICDET.T_HEAD.BACKBONE "separate_frozen" needs T_HEAD.FROZEN_WEIGHTS: the '
            "checkpoint of a trained MimicDet (a full one, not a deploy one)"
        )
    checkpointer = WeightsOnlyCheckpointer(t_head)
    state = checkpointer._load_file(checkpointer.path_manager.get_local_path(path))["model"]
    pyramid = "t_backbone." if any(k.startswith("t_backbone.") for k in state) else "backbone."
    for prefix, module in ((pyramid, t_backbone), ("roi_heads.", t_head)):
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(part, strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"T_HEAD.FROZEN_WEIGHTS {path}: its {prefix}* tensors do not make the frozen "
                f"T-head (a deploy checkpoint has no T-head): {e}"
            ) from e
    logger.info(f"Frozen T-head and its pyramid ({pyramid}*) loaded from {path}")


def _touch_unpooled_levels(t_losses, t_features, t_head) -> Dict[str, Tensor]:
    """
    The T-head's own pyramid computes levels the T-head never pools (P7 when staggered); DDP
    without ``find_unused_parameters`` would wait forever for their convs' gradients, so they
    join the T-head's loss with weight 0.
    """
    pooled = {f"p{lvl}" for lvl in t_head.pool_levels}
    unused = [x.sum() for f, x in t_features.items() if f not in pooled]
    if unused:
        name = next(iter(t_losses))
        t_losses = {**t_losses, name: t_losses[name] + 0.0 * sum(unused)}
    return t_losses


def _check_training_levels(backbone: Backbone, t_head: Optional[nn.Module], head_in_features):
    """
    In training, every level the backbone computes must be read (DDP runs without
    ``find_unused_parameters``) and every level the T-head pools from must be computed.
    """
    if not hasattr(backbone, "finest_level_in_training"):
        return
    dense_levels = [int(f[1:]) for f in head_in_features]
    pooled = t_head.pool_levels if t_head is not None else []
    needs_finest = any(lvl < min(dense_levels) for lvl in pooled)
    if backbone.finest_level_in_training != needs_finest:
        raise ValueError(
            f"The backbone's finest_level_in_training is {backbone.finest_level_in_training}, "
            f"but the T-head pools from levels {pooled or 'none'} and the dense heads read "
            f"{head_in_features}: set it to {needs_finest} (yaml configs derive it from "
            "MODEL.MIMICDET.T_HEAD.ENABLED and MODEL.MIMICDET.STAGGERED)"
        )


def mean_over_workers(x: Tensor) -> Tensor:
    """The mean of a tensor over all training processes (itself when there is one)."""
    world_size = comm.get_world_size()
    if world_size == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size


def _explain_absent_training_only_weights(model: MimicDet, incompatible_keys):
    """
    A deployed checkpoint (``tools/convert_to_deploy.py``) has no T-head and no P2 branch; say so
    once instead of listing every tensor as missing.
    """
    prefixes = ["roi_heads."]
    for name in getattr(model.backbone, "training_only_modules", []):
        prefixes.append(f"backbone.{name}.")
    absent = [k for k in incompatible_keys.missing_keys if k.startswith(tuple(prefixes))]
    if not absent:
        return
    for k in absent:
        incompatible_keys.missing_keys.remove(k)
    logger.info(
        f"Checkpoint has no weights for the training-only modules {sorted(set(prefixes))} "
        f"({len(absent)} tensors): they keep their initialisation; inference never runs them."
    )
