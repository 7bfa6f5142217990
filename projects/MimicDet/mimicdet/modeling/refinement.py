"""The refinement module: one anchor per location, objectness and a first box regression."""

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, batched_nms, cat, get_norm, nonzero_tuple
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransform, _dense_box_regression_loss
from detectron2.structures import Boxes, Instances
from fvcore.nn import sigmoid_focal_loss
from torch import Tensor, nn

from .level_assignment import LevelAssigner

__all__ = ["RefinementModule"]


class RefinementModule(nn.Module):
    """
    Shared across P3..P7: ``num_convs`` 3x3 convs with ReLU (the paper has one), then sibling 1x1
    convs for one objectness logit and 4 box deltas per location; one square anchor per location.

    It also labels anchors (by scale and centre), computes its own losses and turns its
    predictions into the refined boxes that the S-head classifies and the T-head samples from.
    Dense predictions are handled flattened over levels: ``R = sum_i Hi * Wi`` per image, level
    by level, row-major within a level; that flat index is a refined box's "anchor location".
    """

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        conv_dim: int,
        num_convs: int = 1,
        norm: str = "",
        strides: List[int],
        anchor_size_per_stride: float,
        anchor_offset: float,
        level_assigner: LevelAssigner,
        center_sampling_ratio: float,
        min_center_radius: float,
        ignore_sampling_ratio: float = 0.0,
        bbox_reg_weights: Tuple[float, float, float, float],
        box_reg_loss_type: str = "smooth_l1",
        prior_prob: float,
        focal_loss_alpha: float = -1.0,
        focal_loss_gamma: float = 0.0,
        pre_nms_topk_train: int,
        nms_thresh_train: float,
        post_nms_topk_train: int,
        topk_test: int,
    ):
        """
        Args:
            in_channels: channels of every input level.
            conv_dim: channels of the 3x3 convs.
            num_convs: 3x3 convs (each with ``norm`` and ReLU) before the two 1x1 convs.
            norm: normalization after each 3x3 conv (a :func:`detectron2.layers.get_norm` name,
                e.g. ``"GN"``), or ``""`` for none.
            strides: stride of each input level, fine to coarse, e.g. ``[8, 16, 32, 64, 128]``.
            anchor_size_per_stride: anchor side in units of its level's stride.
            anchor_offset: anchor centre within its cell, in strides (0.5 = cell centre).
            level_assigner: which levels each GT trains on, by its scale; with the
                ``"anchor_scale"`` rule its anchor sizes must be this module's anchors.
            center_sampling_ratio: an anchor is positive if its centre lies in the GT shrunk about
                its centre to this fraction of its width and height.
            min_center_radius: lower bound of the shrunk box's half-size, in strides.
            ignore_sampling_ratio: anchors of a GT's level that are not positive but whose
                centres lie in the GT shrunk to this fraction are left out of the objectness
                loss (FoveaBox's band between positives and negatives); at or below
                ``center_sampling_ratio`` there is no such band.
            bbox_reg_weights: :class:`Box2BoxTransform` weights from anchor to refined box.
            box_reg_loss_type: detectron2's dense box loss, ``"smooth_l1"`` (with beta 0: the
                paper's L1 on the deltas) or ``"giou"`` (on the decoded boxes, as FCOS).
            prior_prob: initial foreground probability of the objectness logit.
            focal_loss_alpha, focal_loss_gamma: the objectness loss is fvcore's
                ``sigmoid_focal_loss``; ``gamma = 0`` with ``alpha < 0`` is plain BCE (the paper).
            pre_nms_topk_train: refined boxes per level kept, by objectness, before the NMS.
            nms_thresh_train: IoU of the per-image NMS over refined boxes in training.
            post_nms_topk_train: refined boxes per image kept after the NMS in training.
            topk_test: refined boxes per image kept, by objectness, at inference (no NMS).
        """
        super().__init__()
        self.convs = nn.Sequential(
            *[
                Conv2d(
                    in_channels if i == 0 else conv_dim,
                    conv_dim,
                    kernel_size=3,
                    padding=1,
                    bias=not norm,
                    norm=get_norm(norm, conv_dim),
                    activation=F.relu,
                )
                for i in range(num_convs)
            ]
        )
        self.objectness = nn.Conv2d(conv_dim, 1, kernel_size=1)
        self.box_deltas = nn.Conv2d(conv_dim, 4, kernel_size=1)
        for layer in [*self.convs, self.objectness, self.box_deltas]:
            nn.init.normal_(layer.weight, std=0.01)
            if layer.bias is not None:
                nn.init.constant_(layer.bias, 0.0)
        nn.init.constant_(self.objectness.bias, -math.log((1 - prior_prob) / prior_prob))

        self.anchor_generator = DefaultAnchorGenerator(
            sizes=[[anchor_size_per_stride * s] for s in strides],
            aspect_ratios=[[1.0]],
            strides=strides,
            offset=anchor_offset,
        )
        self.levels = [int(math.log2(s)) for s in strides]
        if level_assigner.levels != self.levels:
            raise ValueError(
                f"The level assigner's levels {level_assigner.levels} are not the refinement's "
                f"{self.levels}"
            )
        anchor_sizes = [anchor_size_per_stride * s for s in strides]
        if level_assigner.rule == "anchor_scale" and level_assigner.anchor_sizes != anchor_sizes:
            raise ValueError(
                f"The level assigner's anchor sizes {level_assigner.anchor_sizes} are not the "
                f"refinement's anchors {anchor_sizes}: the scale ranges must match the anchors"
            )
        self.level_assigner = level_assigner
        self.center_sampling_ratio = center_sampling_ratio
        self.min_center_radius = min_center_radius
        self.ignore_sampling_ratio = ignore_sampling_ratio
        self.box2box_transform = Box2BoxTransform(weights=bbox_reg_weights)
        self.box_reg_loss_type = box_reg_loss_type
        self.focal_loss_alpha = focal_loss_alpha
        self.focal_loss_gamma = focal_loss_gamma
        self.pre_nms_topk_train = pre_nms_topk_train
        self.nms_thresh_train = nms_thresh_train
        self.post_nms_topk_train = post_nms_topk_train
        self.topk_test = topk_test

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        rcfg = cfg.MODEL.MIMICDET.REFINE
        return {
            "in_channels": input_shape[0].channels,
            "conv_dim": rcfg.CONV_DIM,
            "num_convs": rcfg.NUM_CONVS,
            "norm": rcfg.NORM,
            "strides": [s.stride for s in input_shape],
            "anchor_size_per_stride": rcfg.ANCHOR_SIZE_PER_STRIDE,
            "anchor_offset": rcfg.ANCHOR_OFFSET,
            "level_assigner": LevelAssigner(cfg),
            "center_sampling_ratio": rcfg.CENTER_SAMPLING_RATIO,
            "min_center_radius": rcfg.MIN_CENTER_RADIUS,
            "ignore_sampling_ratio": rcfg.IGNORE_SAMPLING_RATIO,
            "bbox_reg_weights": rcfg.BBOX_REG_WEIGHTS,
            "box_reg_loss_type": rcfg.BBOX_REG_LOSS_TYPE,
            "prior_prob": rcfg.PRIOR_PROB,
            "focal_loss_alpha": rcfg.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": rcfg.FOCAL_LOSS_GAMMA,
            "pre_nms_topk_train": rcfg.PRE_NMS_TOPK_TRAIN,
            "nms_thresh_train": rcfg.NMS_THRESH_TRAIN,
            "post_nms_topk_train": rcfg.POST_NMS_TOPK_TRAIN,
            "topk_test": rcfg.TOPK_TEST,
        }

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before REFINE.NUM_CONVS name the single conv "conv", not "convs.0"
        old = prefix + "conv."
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[prefix + "convs.0." + key[len(old) :]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """
        Args:
            features: per level ``(N, C, Hi, Wi)``.

        Returns:
            objectness logits per level ``(N, 1, Hi, Wi)`` and deltas per level ``(N, 4, Hi, Wi)``.
        """
        logits, deltas = [], []
        for x in features:
            t = self.convs(x)
            logits.append(self.objectness(t))
            deltas.append(self.box_deltas(t))
        return logits, deltas

    def anchors(self, features: List[Tensor]) -> Tuple[Boxes, Tensor]:
        """
        Returns:
            the anchors of all levels, ``(R, 4)`` Boxes, and each anchor's level, ``(R,)`` int64.
        """
        anchors = self.anchor_generator(features)
        levels = [
            torch.full((len(a),), lvl, device=a.device) for a, lvl in zip(anchors, self.levels)
        ]
        return Boxes.cat(anchors), torch.cat(levels)

    def _inside_shrunk_gt(
        self, centers: Tensor, strides: Tensor, gt: Tensor, ratio: float
    ) -> Tensor:
        """``(R, G)``: anchor centre inside the GT shrunk about its centre to ``ratio``."""
        gt_centers = (gt[:, :2] + gt[:, 2:]) / 2
        half_size = torch.maximum(
            (gt[:, 2:] - gt[:, :2])[None] * ratio / 2, strides[:, :, None] * self.min_center_radius
        )  # (R, G, 2)
        return ((centers[:, None] - gt_centers[None]).abs() <= half_size).all(dim=2)

    @torch.no_grad()
    def label_anchors(
        self, anchors: Boxes, anchor_levels: Tensor, gt_instances: List[Instances]
    ) -> Tuple[Tensor, Tensor]:
        """
        Each GT trains on the levels whose scale range holds it (``level_assigner``); an anchor
        of such a level is positive if its centre lies in the GT shrunk about its centre (the
        smallest such GT wins), ignored if it is not positive but lies in the GT shrunk to
        ``ignore_sampling_ratio``, negative otherwise.

        Args:
            anchors: ``(R, 4)``; anchor_levels: ``(R,)``.
            gt_instances: per image, with ``gt_boxes``.

        Returns:
            ``(N, R)`` int64 labels, 1 positive, 0 negative, -1 ignored (detectron2's
            convention), and ``(N, R, 4)`` the GT box of each positive (zeros elsewhere).
        """
        centers = anchors.get_centers()
        strides = (2.0 ** anchor_levels.float())[:, None]
        level_offsets = anchor_levels - self.levels[0]
        gt_labels, matched_boxes = [], []
        for inst in gt_instances:
            gt = inst.gt_boxes.tensor
            labels = torch.zeros(len(anchors), dtype=torch.int64, device=gt.device)
            if len(gt) == 0:
                gt_labels.append(labels)
                matched_boxes.append(torch.zeros_like(anchors.tensor))
                continue
            on_level = self.level_assigner.level_mask(gt).T[level_offsets]  # (R, G)
            inside = self._inside_shrunk_gt(centers, strides, gt, self.center_sampling_ratio)
            area = Boxes(gt).area()[None].expand(len(anchors), -1)
            area = torch.where(inside & on_level, area, torch.full_like(area, float("inf")))
            min_area, idx = area.min(dim=1)
            positive = torch.isfinite(min_area)
            if self.ignore_sampling_ratio > self.center_sampling_ratio:
                band = self._inside_shrunk_gt(centers, strides, gt, self.ignore_sampling_ratio)
                labels[(band & on_level).any(dim=1)] = -1
            labels[positive] = 1
            gt_labels.append(labels)
            matched_boxes.append(gt[idx])
        return torch.stack(gt_labels), torch.stack(matched_boxes)

    def losses(
        self,
        anchors: Boxes,
        pred_logits: Tensor,
        pred_deltas: Tensor,
        gt_labels: Tensor,
        gt_boxes: Tensor,
        normalizer: float,
    ):
        """
        BCE (focal when ``focal_loss_gamma > 0``) over all anchors but the ignored ones and the
        box loss (L1 on the deltas, or GIoU) over positives, both summed and divided by
        ``normalizer`` (an EMA of the number of positives kept by the meta-architecture).

        Args:
            anchors: ``(R, 4)``; pred_logits: ``(N, R)``; pred_deltas: ``(N, R, 4)``;
            gt_labels: ``(N, R)`` as :meth:`label_anchors`; gt_boxes: ``(N, R, 4)``.
        """
        valid = gt_labels >= 0
        loss_cls = sigmoid_focal_loss(
            pred_logits[valid],
            gt_labels[valid].to(pred_logits.dtype),
            alpha=self.focal_loss_alpha,
            gamma=self.focal_loss_gamma,
            reduction="sum",
        )
        loss_box = _dense_box_regression_loss(
            [anchors],
            self.box2box_transform,
            [pred_deltas],
            list(gt_boxes),
            gt_labels == 1,
            box_reg_loss_type=self.box_reg_loss_type,
            smooth_l1_beta=0.0,
        )
        return {"loss_refine_cls": loss_cls / normalizer, "loss_refine_box": loss_box / normalizer}

    @torch.no_grad()
    def refined_boxes(
        self,
        anchors: Boxes,
        anchor_levels: Tensor,
        pred_logits: Tensor,
        pred_deltas: Tensor,
        image_sizes: List[Tuple[int, int]],
    ) -> List[Instances]:
        """
        Decode the refined boxes and keep, per image, the top ``pre_nms_topk_train`` per level,
        NMS, top ``post_nms_topk_train`` (training) or the top ``topk_test`` by objectness
        (inference).

        Args:
            anchors: ``(R, 4)``; anchor_levels: ``(R,)``; pred_logits: ``(N, R)``;
            pred_deltas: ``(N, R, 4)``.

        Returns:
            per image, Instances with ``proposal_boxes`` (detached), ``objectness_logits``,
            ``levels`` (the pyramid level, e.g. 3) and ``anchor_index`` (flat location in R).
        """
        results = []
        for logits, deltas, image_size in zip(pred_logits, pred_deltas, image_sizes):
            if self.training:
                candidates = []
                for level in self.levels:
                    idx = nonzero_tuple(anchor_levels == level)[0]
                    k = min(self.pre_nms_topk_train, len(idx))
                    candidates.append(idx[logits[idx].topk(k).indices])
                idx = cat(candidates)
            else:
                idx = logits.topk(min(self.topk_test, len(logits))).indices
            boxes = Boxes(self.box2box_transform.apply_deltas(deltas[idx], anchors.tensor[idx]))
            boxes.clip(image_size)
            keep = boxes.nonempty()
            idx, boxes = idx[keep], boxes[keep]
            if self.training:
                # one NMS over all levels: refined boxes of neighbouring levels may coincide
                keep = batched_nms(
                    boxes.tensor, logits[idx], torch.zeros_like(idx), self.nms_thresh_train
                )[: self.post_nms_topk_train]
                idx, boxes = idx[keep], boxes[keep]
            inst = Instances(image_size)
            inst.proposal_boxes = boxes
            inst.objectness_logits = logits[idx]
            inst.levels = anchor_levels[idx]
            inst.anchor_index = idx
            results.append(inst)
        return results
