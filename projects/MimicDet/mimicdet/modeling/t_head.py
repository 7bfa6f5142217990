"""The T-head: a two-stage head on sparse refined boxes, used in training only."""

import math
import re
from typing import Dict, List, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat, nonzero_tuple
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.poolers import ROIPooler, convert_boxes_to_pooler_format
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, ROIHeads
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Boxes, Instances
from torch import Tensor

from .level_assignment import LevelAssigner

__all__ = ["MimicTHead"]


@ROI_HEADS_REGISTRY.register()
class MimicTHead(ROIHeads):
    """
    Samples refined boxes with detectron2's ``label_and_sample_proposals``, pools each one 7x7
    from its own level (one finer than the S-head's level when staggered), then runs two paths,
    each a detectron2 :class:`FastRCNNConvFCHead`: classification fc-fc (``cls_head``), then
    fc(C + 1), and regression 4 x conv3x3 - fc (``reg_head``, the regression feature), then fc4
    (class-agnostic deltas). Returns the sampled boxes with the teacher's logits and regression
    features for the mimic loss.
    """

    @configurable
    def __init__(
        self,
        *,
        pool_levels: List[int],
        staggered: bool,
        level_assigner: LevelAssigner,
        in_channels: int,
        pooler_resolution: int,
        pooler_type: str,
        pooler_sampling_ratio: int,
        num_conv: int,
        conv_dim: int,
        num_fc: int,
        fc_dim: int,
        bbox_reg_weights: Tuple[float, float, float, float],
        smooth_l1_beta: float,
        box_reg_loss_type: str = "smooth_l1",
        num_classes: int,
        proposal_append_gt: bool = True,
        **kwargs,
    ):
        """
        Args:
            pool_levels: pyramid levels pooled from, fine to coarse, e.g. ``[2, ..., 6]``
                (features named ``"p{level}"``).
            staggered: pool a box handled on level k from level k - 1 (else from level k).
            level_assigner: the refinement's level rule; an appended GT box is handled on its
                nearest level.
            in_channels: channels of the pooled features.
            pooler_resolution, pooler_type, pooler_sampling_ratio: as detectron2's ROI box head.
            num_conv, conv_dim: 3x3 convs of the regression path.
            num_fc, fc_dim: fcs of the classification path; the regression path has one fc.
            bbox_reg_weights, smooth_l1_beta, box_reg_loss_type: class-agnostic box loss of the
                predictor (:class:`FastRCNNOutputLayers`).
            num_classes: foreground classes ``C``.
            proposal_append_gt: add the GT boxes to the sampling pool (they get a level by
                ``level_assigner`` and no anchor location).
            kwargs: the sampling arguments of :class:`ROIHeads`.
        """
        # detectron2's GT appending needs every proposal field on the GT; ours carry levels
        super().__init__(num_classes=num_classes, proposal_append_gt=False, **kwargs)
        self.append_gt = proposal_append_gt
        self.pool_levels = list(pool_levels)
        self.staggered = staggered
        self.level_assigner = level_assigner
        self.pooler = ROIPooler(
            output_size=pooler_resolution,
            scales=[1.0 / 2**lvl for lvl in self.pool_levels],
            sampling_ratio=pooler_sampling_ratio,
            pooler_type=pooler_type,
        )
        pooled = ShapeSpec(channels=in_channels, height=pooler_resolution, width=pooler_resolution)
        self.cls_head = FastRCNNConvFCHead(pooled, conv_dims=[], fc_dims=[fc_dim] * num_fc)
        self.reg_head = FastRCNNConvFCHead(
            pooled, conv_dims=[conv_dim] * num_conv, fc_dims=[fc_dim]
        )
        self.box_predictor = FastRCNNOutputLayers(
            ShapeSpec(channels=fc_dim),
            box2box_transform=Box2BoxTransform(weights=bbox_reg_weights),
            num_classes=num_classes,
            cls_agnostic_bbox_reg=True,
            smooth_l1_beta=smooth_l1_beta,
            box_reg_loss_type=box_reg_loss_type,
        )

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        ret = super().from_config(cfg)
        staggered = cfg.MODEL.MIMICDET.STAGGERED
        dense_levels = [int(f[1:]) for f in cfg.MODEL.MIMICDET.REFINE.IN_FEATURES]
        pool_levels = [lvl - 1 for lvl in dense_levels] if staggered else dense_levels
        tcfg = cfg.MODEL.MIMICDET.T_HEAD
        ret.update(
            {
                "pool_levels": pool_levels,
                "staggered": staggered,
                "level_assigner": LevelAssigner(cfg),
                "in_channels": input_shape[f"p{pool_levels[0]}"].channels,
                "pooler_resolution": cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION,
                "pooler_type": cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE,
                "pooler_sampling_ratio": cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
                "num_conv": tcfg.NUM_CONV,
                "conv_dim": tcfg.CONV_DIM,
                "num_fc": tcfg.NUM_FC,
                "fc_dim": tcfg.FC_DIM,
                "bbox_reg_weights": cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS,
                "smooth_l1_beta": cfg.MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA,
                "box_reg_loss_type": cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE,
            }
        )
        return ret

    def pool(self, features: List[Tensor], boxes: List[Boxes], pool_levels: Tensor) -> Tensor:
        """
        RoIAlign each box from its given level (not by area, as ``ROIPooler.forward`` would).

        Args:
            features: one map per ``self.pool_levels``, ``(N, C, Hi, Wi)``.
            boxes: per image, Boxes; M boxes in all.
            pool_levels: ``(M,)`` the pyramid level of each box, in ``self.pool_levels``.

        Returns:
            ``(M, C, R, R)`` pooled features.
        """
        unknown = set(pool_levels.unique().tolist()) - set(self.pool_levels)
        if unknown:
            # such a box would otherwise be pooled as zeros and train the T-head on nothing
            raise ValueError(
                f"Boxes on levels {sorted(unknown)} cannot be pooled: the T-head pools from "
                f"levels {self.pool_levels} (MODEL.MIMICDET.STAGGERED, REFINE.IN_FEATURES)"
            )
        rois = convert_boxes_to_pooler_format(boxes)
        out = features[0].new_zeros((len(rois), features[0].shape[1]) + self.pooler.output_size)
        for x, level, pooler in zip(features, self.pool_levels, self.pooler.level_poolers):
            inds = nonzero_tuple(pool_levels == level)[0]
            out.index_put_((inds,), pooler(x, rois[inds]))
        return out

    def _box_head(
        self, features: Dict[str, Tensor], boxes: List[Instances]
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """
        Pools each box of ``boxes`` (``proposal_boxes`` with the S-head's ``levels``) and runs
        both paths; returns class logits ``(M, C + 1)``, deltas ``(M, 4)`` and regression
        features ``(M, fc_dim)`` over all images.
        """
        x = self.pool(
            [features[f"p{lvl}"] for lvl in self.pool_levels],
            [b.proposal_boxes for b in boxes],
            cat([b.levels for b in boxes]) - int(self.staggered),
        )
        reg_feat = self.reg_head(x)
        cls_logits = self.box_predictor.cls_score(self.cls_head(x))
        return cls_logits, self.box_predictor.bbox_pred(reg_feat), reg_feat

    @torch.no_grad()
    def predict(
        self, features: Dict[str, Tensor], boxes: List[Instances]
    ) -> List[Tuple[Tensor, Tensor]]:
        """
        The T-head as the box head of a two-stage detector, for diagnostics: what the S-head
        is taught to match (:meth:`MimicDet.mixed_inference`).

        Args:
            features: pyramid maps including the training-only finer levels.
            boxes: per image, refined boxes with ``proposal_boxes`` and ``levels``.

        Returns:
            per image, the boxes its deltas give ``(Ki, 4)`` (decoded with its own
            ``BBOX_REG_WEIGHTS``) and foreground class probabilities ``(Ki, C)``, as
            :meth:`SHead.predict` returns the S-head's.
        """
        predictions = self._box_head(features, boxes)[:2]  # class logits, deltas
        pred_boxes = self.box_predictor.predict_boxes(predictions, boxes)
        probs = self.box_predictor.predict_probs(predictions, boxes)
        return [(b, p[:, : self.num_classes]) for b, p in zip(pred_boxes, probs)]

    def _append_gt(self, proposals: List[Instances], targets: List[Instances]) -> List[Instances]:
        out = []
        for props, gt in zip(proposals, targets):
            boxes = gt.gt_boxes.tensor
            gt_props = Instances(props.image_size)
            gt_props.proposal_boxes = gt.gt_boxes
            # probability ~1, as detectron2 gives appended GT boxes
            gt_props.objectness_logits = torch.full_like(boxes[:, 0], math.log(1e10))
            gt_props.levels = self.level_assigner.nearest_levels(boxes)
            # no anchor location: GT boxes never enter the mimic loss
            gt_props.anchor_index = torch.full_like(gt_props.levels, -1)
            out.append(Instances.cat([props, gt_props]))
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before the towers were FastRCNNConvFCHeads name them cls_fcs.{k},
        # reg_convs.{k} and reg_fc
        renames = [
            (r"cls_fcs\.(\d+)\.", lambda m: f"cls_head.fc{int(m.group(1)) + 1}."),
            (r"reg_convs\.(\d+)\.", lambda m: f"reg_head.conv{int(m.group(1)) + 1}."),
            (r"reg_fc\.", lambda m: "reg_head.fc1."),
        ]
        for key in [k for k in state_dict if k.startswith(prefix)]:
            for pattern, new in renames:
                m = re.match(pattern, key[len(prefix) :])
                if m:
                    state_dict[prefix + new(m) + key[len(prefix) + m.end() :]] = state_dict.pop(key)
                    break
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(
        self,
        images,
        features: Dict[str, Tensor],
        proposals: List[Instances],
        targets: List[Instances],
    ) -> Tuple[List[Instances], Dict[str, Tensor]]:
        """
        Training only.

        Args:
            images: ImageList (unused, kept for the :class:`ROIHeads` interface).
            features: pyramid maps ``"p{level}"`` -> ``(N, C, Hi, Wi)``.
            proposals: per image, refined boxes with ``proposal_boxes``, ``objectness_logits``,
                ``levels`` (the S-head level) and ``anchor_index``.
            targets: per image, GT Instances.

        Returns:
            the sampled boxes per image, with the labels of ``label_and_sample_proposals`` and
            ``teacher_cls_logits`` ``(Mi, C + 1)`` and ``teacher_reg_feats`` ``(Mi, fc_dim)``;
            and the losses ``loss_t_cls``, ``loss_t_box``.
        """
        assert self.training, "the T-head is a training-only module"
        if self.append_gt:
            proposals = self._append_gt(proposals, targets)
        proposals = self.label_and_sample_proposals(proposals, targets)

        cls_logits, deltas, reg_feat = self._box_head(features, proposals)
        losses = self.box_predictor.losses((cls_logits, deltas), proposals)
        losses = {"loss_t_cls": losses["loss_cls"], "loss_t_box": losses["loss_box_reg"]}
        num_per_image = [len(p) for p in proposals]
        for p, logits, feats in zip(
            proposals, cls_logits.split(num_per_image), reg_feat.split(num_per_image)
        ):
            p.teacher_cls_logits = logits
            p.teacher_reg_feats = feats
        return proposals, losses
