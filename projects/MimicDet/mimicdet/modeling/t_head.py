"""The T-head: a two-stage head on sparse refined boxes, used in training only."""

import math
from typing import Dict, List, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat, nonzero_tuple
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.poolers import ROIPooler, convert_boxes_to_pooler_format
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, ROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Boxes, Instances
from torch import Tensor, nn

from .refinement import canonical_levels

__all__ = ["MimicTHead"]


@ROI_HEADS_REGISTRY.register()
class MimicTHead(ROIHeads):
    """
    Samples refined boxes with detectron2's ``label_and_sample_proposals``, pools each one 7x7
    from its own level (one finer than the S-head's level when staggered), then runs two paths:
    classification fc-fc-fc(C + 1) and regression 4 x conv3x3 - fc (the regression feature) - fc4
    (class-agnostic deltas). Returns the sampled boxes with the teacher's logits and regression
    features for the mimic loss.
    """

    @configurable
    def __init__(
        self,
        *,
        pool_levels: List[int],
        staggered: bool,
        canonical_box_size: float,
        canonical_level: int,
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
            canonical_box_size, canonical_level: level rule for the appended GT boxes (the same
                rule the refinement assigns GTs with).
            in_channels: channels of the pooled features.
            pooler_resolution, pooler_type, pooler_sampling_ratio: as detectron2's ROI box head.
            num_conv, conv_dim: 3x3 convs of the regression path.
            num_fc, fc_dim: fcs of the classification path; the regression path has one fc.
            bbox_reg_weights, smooth_l1_beta, box_reg_loss_type: class-agnostic box loss of the
                predictor (:class:`FastRCNNOutputLayers`).
            num_classes: foreground classes ``C``.
            proposal_append_gt: add the GT boxes to the sampling pool (they get a level by the
                canonical rule and no anchor location).
            kwargs: the sampling arguments of :class:`ROIHeads`.
        """
        # detectron2's GT appending needs every proposal field on the GT; ours carry levels
        super().__init__(num_classes=num_classes, proposal_append_gt=False, **kwargs)
        self.append_gt = proposal_append_gt
        self.pool_levels = list(pool_levels)
        self.staggered = staggered
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level
        self.pooler = ROIPooler(
            output_size=pooler_resolution,
            scales=[1.0 / 2**lvl for lvl in self.pool_levels],
            sampling_ratio=pooler_sampling_ratio,
            pooler_type=pooler_type,
        )
        pooled_dim = in_channels * pooler_resolution**2

        self.cls_fcs = nn.ModuleList()
        for k in range(num_fc):
            self.cls_fcs.append(nn.Linear(pooled_dim if k == 0 else fc_dim, fc_dim))
            weight_init.c2_xavier_fill(self.cls_fcs[-1])
        self.reg_convs = nn.ModuleList()
        for k in range(num_conv):
            self.reg_convs.append(
                nn.Conv2d(in_channels if k == 0 else conv_dim, conv_dim, kernel_size=3, padding=1)
            )
            weight_init.c2_msra_fill(self.reg_convs[-1])
        self.reg_fc = nn.Linear(
            (conv_dim if num_conv else in_channels) * pooler_resolution**2, fc_dim
        )
        weight_init.c2_xavier_fill(self.reg_fc)
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
                "canonical_box_size": cfg.MODEL.MIMICDET.REFINE.CANONICAL_BOX_SIZE,
                "canonical_level": cfg.MODEL.MIMICDET.REFINE.CANONICAL_LEVEL,
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
        cls_feat = x.flatten(1)
        for fc in self.cls_fcs:
            cls_feat = F.relu(fc(cls_feat))
        reg_feat = x
        for conv in self.reg_convs:
            reg_feat = F.relu(conv(reg_feat))
        reg_feat = F.relu(self.reg_fc(reg_feat.flatten(1)))
        cls_logits = self.box_predictor.cls_score(cls_feat)
        return cls_logits, self.box_predictor.bbox_pred(reg_feat), reg_feat

    @torch.no_grad()
    def predict(
        self, features: Dict[str, Tensor], boxes: List[Instances]
    ) -> List[Tuple[Tensor, Tensor]]:
        """
        The T-head as the box head of a two-stage detector, for diagnostics: what the S-head
        is taught to match (:meth:`MimicDet.teacher_inference`).

        Args:
            features: pyramid maps including the training-only finer levels.
            boxes: per image, refined boxes with ``proposal_boxes`` and ``levels``.

        Returns:
            per image, class logits ``(Ki, C + 1)`` and deltas ``(Ki, 4)``.
        """
        cls_logits, deltas, _ = self._box_head(features, boxes)
        num_per_image = [len(b) for b in boxes]
        return list(zip(cls_logits.split(num_per_image), deltas.split(num_per_image)))

    def _append_gt(self, proposals: List[Instances], targets: List[Instances]) -> List[Instances]:
        dense_levels = [lvl + 1 for lvl in self.pool_levels] if self.staggered else self.pool_levels
        out = []
        for props, gt in zip(proposals, targets):
            boxes = gt.gt_boxes.tensor
            gt_props = Instances(props.image_size)
            gt_props.proposal_boxes = gt.gt_boxes
            # probability ~1, as detectron2 gives appended GT boxes
            gt_props.objectness_logits = torch.full_like(boxes[:, 0], math.log(1e10))
            gt_props.levels = canonical_levels(
                boxes,
                self.canonical_box_size,
                self.canonical_level,
                dense_levels[0],
                dense_levels[-1],
            )
            # no anchor location: GT boxes never enter the mimic loss
            gt_props.anchor_index = torch.full_like(gt_props.levels, -1)
            out.append(Instances.cat([props, gt_props]))
        return out

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
