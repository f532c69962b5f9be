"""ZeroHead's training losses (GFL family) and the loss module that ties them to AlignedOTA.

* **Quality focal loss** on every anchor and class: the target of the matched class is the
  IoU of the predicted box with its object (0 elsewhere), so the class score also estimates
  localisation quality — what NMS ranks by at inference. Computed from logits for stability.
* **Distribution focal loss** on positives: each box side is a distribution over
  ``0..reg_max`` bins (in strides); the loss pulls mass onto the two bins around the target.
* **GIoU loss** on positives, on the decoded boxes.

Weights follow DAMO-YOLO's ZeroHead (QFL 1.0, GIoU 2.0, DFL 0.25); box losses are weighted
per anchor by its (detached) top class score and normalised by the sum of those weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from damo_plugins.models.head import distances_to_boxes
from damo_plugins.train.assigner import AlignedOTA


def quality_focal_loss(
    logits: torch.Tensor, target: torch.Tensor, beta: float = 2.0
) -> torch.Tensor:
    """Element-wise QFL: BCE(logits, soft target) x |sigmoid(logits) - target|^beta."""
    scale = (logits.sigmoid() - target).abs().pow(beta)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none") * scale


def distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DFL per side: ``logits [..., R+1]``, continuous ``target [...]`` in ``[0, R)``."""
    left = target.floor().long()
    right = left + 1
    w_left = right.to(target.dtype) - target
    w_right = target - left.to(target.dtype)
    logp = F.log_softmax(logits, dim=-1)
    return -(
        logp.gather(-1, left[..., None]).squeeze(-1) * w_left
        + logp.gather(-1, right[..., None]).squeeze(-1) * w_right
    )


def giou_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Element-wise ``1 - GIoU`` of xyxy box pairs ``[N, 4]``."""
    lt = torch.maximum(pred[:, :2], target[:, :2])
    rb = torch.minimum(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_p = (pred[:, 2:] - pred[:, :2]).clamp(min=0).prod(-1)
    area_t = (target[:, 2:] - target[:, :2]).clamp(min=0).prod(-1)
    union = area_p + area_t - inter + eps
    iou = inter / union
    enclose = (
        (torch.maximum(pred[:, 2:], target[:, 2:]) - torch.minimum(pred[:, :2], target[:, :2]))
        .clamp(min=0)
        .prod(-1)
    )
    return 1 - (iou - (enclose - union) / (enclose + eps))


class DetectionLoss:
    """Loss of a DAMO-YOLO model from its raw head outputs and per-image targets.

    Call with ``(cls_logits [N,A,C], reg_logits [N,A,4,R+1], points [1,A,4], strides [1,A,4])``
    — what :meth:`DamoYolo.raw_outputs` returns — and ``targets``: a list of ``[n, 5]``
    tensors ``(class, x1, y1, x2, y2)`` in input pixels. Returns the total loss and its parts.
    """

    def __init__(
        self,
        num_classes: int,
        reg_max: int = 16,
        *,
        qfl_weight: float = 1.0,
        giou_weight: float = 2.0,
        dfl_weight: float = 0.25,
        assigner: AlignedOTA | None = None,
    ) -> None:
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.qfl_weight, self.giou_weight, self.dfl_weight = qfl_weight, giou_weight, dfl_weight
        self.assigner = assigner or AlignedOTA()
        self.project = torch.arange(reg_max + 1, dtype=torch.float32)

    def decode(
        self, reg_logits: torch.Tensor, points: torch.Tensor, strides: torch.Tensor
    ) -> torch.Tensor:
        """Boxes (xyxy, pixels) from bin logits — the same decoding as the inference head."""
        dist = reg_logits.softmax(-1) @ self.project.to(reg_logits.dtype) * strides
        return distances_to_boxes(points, dist)

    def __call__(
        self, raw: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        cls_logits, reg_logits, points, strides = raw
        cls_logits = cls_logits.float()
        reg_logits = reg_logits.float()
        n = cls_logits.shape[0]
        boxes = self.decode(reg_logits, points, strides)  # [N, A, 4]
        pts, st = points[0, :, :2], strides[0, :, 0]
        cls_target = torch.zeros_like(cls_logits)
        pos_img, pos_anchor, pos_gt_boxes = [], [], []
        for i in range(n):
            t = targets[i]
            gt_labels, gt_boxes = t[:, 0].long(), t[:, 1:5].float()
            a = self.assigner(
                cls_logits[i].detach(), boxes[i].detach(), pts, st, gt_boxes, gt_labels
            )
            pos = torch.nonzero(a.positive).squeeze(1)
            if pos.numel():
                cls_target[i, pos, gt_labels[a.gt_index[pos]]] = (
                    a.iou[pos].clamp(min=0).to(cls_target.dtype)
                )
                pos_img.append(torch.full_like(pos, i))
                pos_anchor.append(pos)
                pos_gt_boxes.append(gt_boxes[a.gt_index[pos]])
        num_pos = sum(int(p.numel()) for p in pos_anchor)
        qfl = quality_focal_loss(cls_logits, cls_target).sum() / max(num_pos, 1)
        if num_pos:
            ii, aa = torch.cat(pos_img), torch.cat(pos_anchor)
            gtb = torch.cat(pos_gt_boxes)
            weight = cls_logits[ii, aa].detach().sigmoid().max(-1).values
            wsum = weight.sum().clamp(min=1e-6)
            giou = (giou_loss(boxes[ii, aa], gtb) * weight).sum() / wsum
            p, s = pts[aa], st[aa][:, None]
            ltrb = torch.cat([p - gtb[:, :2], gtb[:, 2:] - p], dim=-1) / s
            ltrb = ltrb.clamp(0, self.reg_max - 0.01)
            dfl = (distribution_focal_loss(reg_logits[ii, aa], ltrb).mean(-1) * weight).sum() / wsum
        else:
            giou = dfl = reg_logits.sum() * 0.0
        total = self.qfl_weight * qfl + self.giou_weight * giou + self.dfl_weight * dfl
        parts = {
            "qfl": float(qfl.detach()),
            "giou": float(giou.detach()),
            "dfl": float(dfl.detach()),
            "num_pos": num_pos,
        }
        return total, parts
