"""The S-head: a dense one-stage head whose deformable conv follows the refined boxes."""

from typing import Dict, List, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cross_entropy
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.structures import Instances, pairwise_iou
from torch import Tensor, nn

from ..layers import GuidedDeformConv

__all__ = ["SHead"]


class SHead(nn.Module):
    """
    Per level: an offset micro-network (1x1 convs) turns the refinement's 4 deltas per location
    into deformable-conv offsets; a guided deformable conv (k x k, one module per kernel size,
    shared by the levels using it) and ReLU; sibling 1x1 convs to a classification and a
    regression feature (ReLU); 1x1 predictors for ``C + 1`` class logits (index ``C`` is
    background, detectron2's Fast R-CNN convention) and 4 deltas relative to the refined box.
    """

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        conv_dim: int,
        kernel_sizes: List[int],
        offset_dims: List[int],
        fc_dim: int,
        detach_guidance: bool,
        iou_threshold: float,
        batch_size_per_image: int,
        bbox_reg_weights: Tuple[float, float, float, float],
    ):
        """
        Args:
            in_channels: channels of every input level.
            num_classes: foreground classes ``C``.
            conv_dim: output channels of the deformable conv.
            kernel_sizes: deformable-conv kernel size per input level.
            offset_dims: hidden widths of the offset micro-network.
            fc_dim: width of the classification and regression features.
            detach_guidance: stop the S-head's gradient at the refinement's deltas.
            iou_threshold: a refined box is foreground at IoU >= this with a GT.
            batch_size_per_image: classification samples per image (all positives, then the
                highest-loss negatives).
            bbox_reg_weights: :class:`Box2BoxTransform` weights from refined box to output box.
        """
        super().__init__()
        self.num_classes = num_classes
        self.kernel_sizes = list(kernel_sizes)
        self.detach_guidance = detach_guidance
        self.batch_size_per_image = batch_size_per_image

        self.offset_nets = nn.ModuleDict()
        self.deform_convs = nn.ModuleDict()
        for k in sorted(set(self.kernel_sizes)):
            dims = [4] + list(offset_dims)
            layers = []
            for d_in, d_out in zip(dims[:-1], dims[1:]):
                layers += [nn.Conv2d(d_in, d_out, kernel_size=1), nn.ReLU()]
            last = nn.Conv2d(dims[-1], 2 * k * k, kernel_size=1)
            # zero offsets at start: the deformable conv begins as a plain conv
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.offset_nets[f"k{k}"] = nn.Sequential(*layers, last)
            self.deform_convs[f"k{k}"] = GuidedDeformConv(
                in_channels, conv_dim, kernel_size=k, padding=k // 2
            )
            weight_init.c2_msra_fill(self.deform_convs[f"k{k}"])

        self.cls_fc = nn.Conv2d(conv_dim, fc_dim, kernel_size=1)
        self.reg_fc = nn.Conv2d(conv_dim, fc_dim, kernel_size=1)
        for layer in [self.cls_fc, self.reg_fc]:
            weight_init.c2_xavier_fill(layer)
        self.cls_score = nn.Conv2d(fc_dim, num_classes + 1, kernel_size=1)
        self.bbox_pred = nn.Conv2d(fc_dim, 4, kernel_size=1)
        # Fast R-CNN predictor init, the T-head's too
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

        self.proposal_matcher = Matcher([iou_threshold], [0, 1], allow_low_quality_matches=False)
        self.box2box_transform = Box2BoxTransform(weights=bbox_reg_weights)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        scfg = cfg.MODEL.MIMICDET.S_HEAD
        assert len(scfg.KERNEL_SIZES) == len(input_shape), "one S-head kernel size per level"
        return {
            "in_channels": input_shape[0].channels,
            "num_classes": cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            "conv_dim": scfg.CONV_DIM,
            "kernel_sizes": scfg.KERNEL_SIZES,
            "offset_dims": scfg.OFFSET_DIMS,
            "fc_dim": scfg.FC_DIM,
            "detach_guidance": scfg.DETACH_GUIDANCE,
            "iou_threshold": scfg.IOU_THRESHOLD,
            "batch_size_per_image": scfg.BATCH_SIZE_PER_IMAGE,
            "bbox_reg_weights": scfg.BBOX_REG_WEIGHTS,
        }

    def forward(
        self, features: List[Tensor], guidance: List[Tensor]
    ) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """
        Args:
            features: per level ``(N, C_in, Hi, Wi)``.
            guidance: per level ``(N, 4, Hi, Wi)``, the refinement's box deltas.

        Returns:
            per level: class logits ``(N, C + 1, Hi, Wi)``, box deltas ``(N, 4, Hi, Wi)`` and
            regression features ``(N, fc_dim, Hi, Wi)``.
        """
        logits, deltas, reg_feats = [], [], []
        for x, g, k in zip(features, guidance, self.kernel_sizes):
            if self.detach_guidance:
                g = g.detach()
            offset = self.offset_nets[f"k{k}"](g)
            t = F.relu(self.deform_convs[f"k{k}"](x, offset))
            cls_feat = F.relu(self.cls_fc(t))
            reg_feat = F.relu(self.reg_fc(t))
            logits.append(self.cls_score(cls_feat))
            deltas.append(self.bbox_pred(reg_feat))
            reg_feats.append(reg_feat)
        return logits, deltas, reg_feats

    def predict(
        self, refined_boxes: Tensor, pred_logits: Tensor, pred_deltas: Tensor
    ) -> Tuple[Tensor, Tensor]:
        """
        Args:
            refined_boxes: ``(K, 4)``; pred_logits: ``(K, C + 1)``; pred_deltas: ``(K, 4)``.

        Returns:
            output boxes ``(K, 4)`` and foreground class probabilities ``(K, C)``.
        """
        boxes = self.box2box_transform.apply_deltas(pred_deltas, refined_boxes)
        return boxes, F.softmax(pred_logits, dim=1)[:, : self.num_classes]

    def losses(
        self, refined: List[Instances], pred_logits: Tensor, pred_deltas: Tensor, gt_instances
    ) -> Dict[str, Tensor]:
        """
        Each refined box (the refinement's training NMS already removed the easy negatives) is
        labelled by IoU with the GT; cross-entropy over all positives and the highest-loss
        negatives up to ``batch_size_per_image`` per image; L1 over positives. Both are divided
        by the number of classification samples in the batch, as detectron2's Fast R-CNN does,
        so the S-head's and T-head's losses have the same scale.

        Args:
            refined: per image, Instances with ``proposal_boxes`` and ``anchor_index``.
            pred_logits: ``(N, R, C + 1)``; pred_deltas: ``(N, R, 4)``, flattened over levels.
            gt_instances: per image, with ``gt_boxes`` and ``gt_classes``.
        """
        cls_losses, box_losses, num_samples = [], [], 0
        for inst, logits, deltas, gt in zip(refined, pred_logits, pred_deltas, gt_instances):
            logits, deltas = logits[inst.anchor_index], deltas[inst.anchor_index]
            labels = torch.full_like(inst.anchor_index, self.num_classes)
            fg = torch.zeros_like(labels, dtype=torch.bool)
            if len(gt) > 0 and len(inst) > 0:
                matched_idxs, matched_labels = self.proposal_matcher(
                    pairwise_iou(gt.gt_boxes, inst.proposal_boxes)
                )
                fg = matched_labels == 1
                labels[fg] = gt.gt_classes[matched_idxs[fg]]
                target = self.box2box_transform.get_deltas(
                    inst.proposal_boxes.tensor[fg], gt.gt_boxes.tensor[matched_idxs[fg]]
                )
                box_losses.append(F.l1_loss(deltas[fg], target, reduction="sum"))
            ce = cross_entropy(logits, labels, reduction="none")
            num_neg = max(self.batch_size_per_image - int(fg.sum()), 0)
            hard_neg = ce[~fg].topk(min(num_neg, int((~fg).sum()))).values
            cls_losses += [ce[fg].sum(), hard_neg.sum()]
            num_samples += int(fg.sum()) + len(hard_neg)
        normalizer = max(num_samples, 1)
        loss_box = torch.stack(box_losses).sum() if box_losses else pred_deltas.sum() * 0.0
        return {
            "loss_s_cls": torch.stack(cls_losses).sum() / normalizer,
            "loss_s_box": loss_box / normalizer,
        }
