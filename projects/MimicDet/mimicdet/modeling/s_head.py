"""The S-head: a dense one-stage head whose deformable conv follows the refined boxes."""

import math
from typing import Dict, List, Optional, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cross_entropy, nonzero_tuple
from detectron2.modeling.box_regression import Box2BoxTransform, _dense_box_regression_loss
from detectron2.modeling.matcher import Matcher
from detectron2.structures import Instances, pairwise_iou
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from ..layers import GuidedDeformConv

__all__ = ["SHead", "box_aligned_offsets", "hard_mining_samples"]

_HARD_MINING_RULES = ("top_loss", "positives_first")


def hard_mining_samples(
    losses: Tensor, is_fg: Tensor, batch_size: int, rule: str, neg_pos_ratio: float
) -> Tensor:
    """
    Which of one image's boxes the classification loss is taken over.

    Args:
        losses: ``(K,)`` each box's classification loss.
        is_fg: ``(K,)`` bool, the foreground boxes.
        batch_size: samples per image.
        rule: ``"top_loss"``: the ``batch_size`` boxes with the highest loss, foreground and
            background alike (the paper). ``"positives_first"``: every foreground box, then the
            highest-loss background boxes up to ``batch_size`` in all, but never fewer than
            ``neg_pos_ratio`` per foreground box (SSD's 3:1), so that a crowded image still
            trains on background.
        neg_pos_ratio: the negative floor of ``"positives_first"``.

    Returns:
        ``(S,)`` int64 indices into the K boxes.
    """
    if rule == "top_loss":
        return losses.topk(min(batch_size, len(losses))).indices
    fg = nonzero_tuple(is_fg)[0]
    bg = nonzero_tuple(~is_fg)[0]
    num_bg = max(batch_size - len(fg), math.ceil(neg_pos_ratio * len(fg)))
    hard_bg = bg[losses[bg].topk(min(num_bg, len(bg))).indices]
    return torch.cat([fg, hard_bg])


def box_aligned_offsets(
    deltas: Tensor,
    kernel_size: int,
    anchor_size: float,
    anchor_offset: float,
    bbox_reg_weights: Tuple[float, float, float, float],
) -> Tensor:
    """
    Deformable-conv offsets that move the ``k x k`` taps of each location's kernel onto the
    centres of a ``k x k`` grid over the box its anchor is refined to, so that the conv reads
    the refined box rather than the anchor's neighbourhood (AlignDet's RoIConv, computed in
    closed form instead of learned).

    Args:
        deltas: ``(N, 4, H, W)`` the refinement's ``(dx, dy, dw, dh)`` per location.
        kernel_size: ``k`` of the deformable conv (stride 1, padding ``k // 2``, dilation 1).
        anchor_size: the anchor's side in strides of its level.
        anchor_offset: the anchor centre within its cell, in strides.
        bbox_reg_weights: the refinement's :class:`Box2BoxTransform` weights.

    Returns:
        ``(N, 2 * k * k, H, W)`` offsets in cells, ``(dy, dx)`` per tap in row-major order
        (torchvision's layout).
    """
    k = kernel_size
    n, _, h, w = deltas.shape
    # the anchor in cell units: a cell's feature sits at its centre, the anchor's centre
    # anchor_offset into the cell
    center = anchor_offset - 0.5
    anchor = deltas.new_tensor([center - anchor_size / 2] * 2 + [center + anchor_size / 2] * 2)
    boxes = Box2BoxTransform(weights=bbox_reg_weights).apply_deltas(
        deltas.permute(0, 2, 3, 1).reshape(-1, 4), anchor.expand(n * h * w, 4)
    )
    x0, y0, x1, y1 = boxes.view(n, h, w, 4).permute(3, 0, 1, 2)
    grid = (torch.arange(k, dtype=deltas.dtype, device=deltas.device) + 0.5) / k
    taps = torch.arange(k, dtype=deltas.dtype, device=deltas.device) - k // 2
    grid, taps = grid[None, :, None, None], taps[None, :, None, None]
    off_y = y0[:, None] + grid * (y1 - y0)[:, None] - taps  # (N, k, H, W), per tap row
    off_x = x0[:, None] + grid * (x1 - x0)[:, None] - taps  # (N, k, H, W), per tap column
    offsets = torch.stack(
        [off_y[:, :, None].expand(n, k, k, h, w), off_x[:, None, :].expand(n, k, k, h, w)], dim=3
    )
    return offsets.reshape(n, 2 * k * k, h, w)


class SHead(nn.Module):
    """
    Per level: an offset micro-network (1x1 convs) turns the refinement's 4 deltas per location
    into deformable-conv offsets (optionally added to :func:`box_aligned_offsets`, which lay the
    kernel over the refined box); a guided deformable conv (k x k, one module per kernel size,
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
        hard_mining: str = "top_loss",
        neg_pos_ratio: float = 3.0,
        bbox_reg_weights: Tuple[float, float, float, float],
        box_reg_loss_type: str = "smooth_l1",
        box_aligned_guidance: Optional[Dict[str, object]] = None,
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
            batch_size_per_image, hard_mining, neg_pos_ratio: which refined boxes of an image
                the classification loss is taken over (:func:`hard_mining_samples`).
            bbox_reg_weights: :class:`Box2BoxTransform` weights from refined box to output box.
            box_reg_loss_type: ``"smooth_l1"`` (with beta 0: the paper's L1 on the deltas) or
                ``"giou"`` (on the decoded boxes), as detectron2's box heads.
            box_aligned_guidance: None for the paper's offsets (the micro-network alone), or the
                refinement's anchor geometry, ``anchor_size``, ``anchor_offset`` and
                ``bbox_reg_weights`` (see :func:`box_aligned_offsets`), to start the kernel on
                the refined box and let the micro-network learn a residual.
        """
        super().__init__()
        self.num_classes = num_classes
        self.kernel_sizes = list(kernel_sizes)
        self.detach_guidance = detach_guidance
        self.batch_size_per_image = batch_size_per_image
        if hard_mining not in _HARD_MINING_RULES:
            raise ValueError(
                f"Unknown S-head hard mining '{hard_mining}'; expected one of {_HARD_MINING_RULES}"
            )
        self.hard_mining = hard_mining
        self.neg_pos_ratio = neg_pos_ratio

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
        self.box_reg_loss_type = box_reg_loss_type
        self.box_aligned_guidance = box_aligned_guidance

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
            "hard_mining": scfg.HARD_MINING,
            "neg_pos_ratio": scfg.NEG_POS_RATIO,
            "bbox_reg_weights": scfg.BBOX_REG_WEIGHTS,
            "box_reg_loss_type": scfg.BBOX_REG_LOSS_TYPE,
            "box_aligned_guidance": _box_aligned_guidance(cfg),
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
            if self.box_aligned_guidance is not None:
                offset = offset + box_aligned_offsets(g, k, **self.box_aligned_guidance)
            t = F.relu(self.deform_convs[f"k{k}"](x, offset))
            cls_feat = F.relu(self.cls_fc(t))
            reg_feat = F.relu(self.reg_fc(t))
            logits.append(self.cls_score(cls_feat))
            deltas.append(self.bbox_pred(reg_feat))
            reg_feats.append(reg_feat)
        return logits, deltas, reg_feats

    def forward_at(
        self, features: List[Tensor], guidance: List[Tensor], positions: List[Tensor]
    ) -> Tuple[Tensor, Tensor]:
        """
        :meth:`forward`'s logits and deltas at a few locations only (inference reads the S-head
        at the refinement's top boxes alone, a few percent of the locations at COCO scale).

        Args:
            features, guidance: as :meth:`forward`.
            positions: per level ``(M_i, 3)`` int64 ``(image, row, col)``.

        Returns:
            class logits ``(M, C + 1)`` and box deltas ``(M, 4)``, rows in the order of the
            levels' positions concatenated.
        """
        logits, deltas = [], []
        for x, g, k, pos in zip(features, guidance, self.kernel_sizes, positions):
            g = g[pos[:, 0], :, pos[:, 1], pos[:, 2]][:, :, None, None]  # (M, 4, 1, 1)
            offset = self.offset_nets[f"k{k}"](g)
            if self.box_aligned_guidance is not None:
                offset = offset + box_aligned_offsets(g, k, **self.box_aligned_guidance)
            t = F.relu(self.deform_convs[f"k{k}"].forward_at(x, offset.flatten(1), pos))
            logits.append(_conv1x1(self.cls_score, F.relu(_conv1x1(self.cls_fc, t))))
            deltas.append(_conv1x1(self.bbox_pred, F.relu(_conv1x1(self.reg_fc, t))))
        return torch.cat(logits), torch.cat(deltas)

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
        labelled by IoU with the GT; cross-entropy over the boxes :func:`hard_mining_samples`
        picks per image; the box loss (L1 or GIoU) over all positives. Both are divided by the
        number of classification samples in the batch, as detectron2's Fast R-CNN does, so the
        S-head's and T-head's losses have the same scale. The sampled foreground and background
        counts per image go to the event storage (``s_head/num_fg_samples``, ``num_bg_samples``).

        Args:
            refined: per image, Instances with ``proposal_boxes`` and ``anchor_index``.
            pred_logits: ``(N, R, C + 1)``; pred_deltas: ``(N, R, 4)``, flattened over levels.
            gt_instances: per image, with ``gt_boxes`` and ``gt_classes``.
        """
        cls_losses, box_losses, num_fg, num_bg = [], [], 0, 0
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
                box_losses.append(
                    _dense_box_regression_loss(
                        [inst.proposal_boxes],
                        self.box2box_transform,
                        [deltas[None]],
                        [gt.gt_boxes.tensor[matched_idxs]],
                        fg[None],
                        box_reg_loss_type=self.box_reg_loss_type,
                        smooth_l1_beta=0.0,
                    )
                )
            ce = cross_entropy(logits, labels, reduction="none")
            picked = hard_mining_samples(
                ce, fg, self.batch_size_per_image, self.hard_mining, self.neg_pos_ratio
            )
            cls_losses.append(ce[picked].sum())
            picked_fg = int(fg[picked].sum())
            num_fg += picked_fg
            num_bg += len(picked) - picked_fg
        storage = get_event_storage()
        storage.put_scalar("s_head/num_fg_samples", num_fg / len(refined))
        storage.put_scalar("s_head/num_bg_samples", num_bg / len(refined))
        normalizer = max(num_fg + num_bg, 1)
        loss_box = torch.stack(box_losses).sum() if box_losses else pred_deltas.sum() * 0.0
        return {
            "loss_s_cls": torch.stack(cls_losses).sum() / normalizer,
            "loss_s_box": loss_box / normalizer,
        }


def _conv1x1(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A 1x1 conv applied to ``(M, C_in)`` rows, i.e. to M single locations."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def _box_aligned_guidance(cfg) -> Optional[Dict[str, object]]:
    """The refinement's anchor geometry when ``S_HEAD.BOX_ALIGNED_OFFSETS`` is on."""
    if not cfg.MODEL.MIMICDET.S_HEAD.BOX_ALIGNED_OFFSETS:
        return None
    rcfg = cfg.MODEL.MIMICDET.REFINE
    return {
        "anchor_size": rcfg.ANCHOR_SIZE_PER_STRIDE,
        "anchor_offset": rcfg.ANCHOR_OFFSET,
        "bbox_reg_weights": tuple(rcfg.BBOX_REG_WEIGHTS),
    }
