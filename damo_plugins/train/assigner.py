"""AlignedOTA: DAMO-YOLO's dynamic label assignment.

Why this assigner: it is what DAMO-YOLO trains ZeroHead with, and it fits a head with no
objectness branch — its cost couples the *classification* score (against an IoU-weighted
soft label, the same target the quality focal loss then uses) with the *regression* quality,
so anchors that both classify and localise well become positives. SimOTA (YOLOX) assumes an
objectness branch; TAL (TOOD/YOLOv8) would also do, but AlignedOTA keeps us on the recipe whose
losses and weights DAMO-YOLO tuned. At our input sizes (a few thousand anchors, a handful of
objects) its per-image cost matrix is cheap.

Per image:

1. candidates: anchor points inside a ground-truth box or within ``center_radius`` strides of
   its centre;
2. cost = soft-label classification cost + ``iou_weight`` x (-log IoU), plus a large penalty
   for anchors not both inside the box and near its centre;
3. dynamic k per object = sum of its top-``topk`` IoUs (at least 1); each object takes its k
   cheapest anchors; an anchor claimed twice goes to the cheaper object.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from damo_plugins.lib.boxes import box_iou


@dataclass
class Assignment:
    """Per anchor: the matched object index (-1 for background) and the IoU with it."""

    gt_index: torch.Tensor  # [A] long
    iou: torch.Tensor  # [A] float, 0 for background

    @property
    def positive(self) -> torch.Tensor:
        return self.gt_index >= 0


class AlignedOTA:
    def __init__(self, center_radius: float = 2.5, topk: int = 10, iou_weight: float = 3.0) -> None:
        self.center_radius = center_radius
        self.topk = topk
        self.iou_weight = iou_weight

    @torch.no_grad()
    def __call__(
        self,
        cls_logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        points: torch.Tensor,
        strides: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor,
    ) -> Assignment:
        """Assign one image. ``cls_logits [A, C]``, ``pred_boxes [A, 4]`` (xyxy, pixels),
        ``points [A, 2]``, ``strides [A]``, ``gt_boxes [G, 4]``, ``gt_labels [G]``."""
        num_anchors = cls_logits.shape[0]
        gt_index = torch.full((num_anchors,), -1, dtype=torch.long)
        ious_out = torch.zeros(num_anchors, dtype=pred_boxes.dtype)
        if gt_boxes.numel() == 0:
            return Assignment(gt_index, ious_out)
        px, py = points[:, 0:1], points[:, 1:2]  # [A, 1]
        in_box = (
            (px > gt_boxes[:, 0])
            & (px < gt_boxes[:, 2])
            & (py > gt_boxes[:, 1])
            & (py < gt_boxes[:, 3])
        )
        cx = (gt_boxes[:, 0] + gt_boxes[:, 2]) / 2
        cy = (gt_boxes[:, 1] + gt_boxes[:, 3]) / 2
        r = self.center_radius * strides[:, None]
        in_center = ((px - cx).abs() < r) & ((py - cy).abs() < r)  # [A, G]
        valid = (in_box | in_center).any(1)
        if not valid.any():
            return Assignment(gt_index, ious_out)
        vidx = torch.nonzero(valid).squeeze(1)
        v_logits = cls_logits[vidx].float()
        v_boxes = pred_boxes[vidx].float()
        ious = box_iou(gt_boxes.float(), v_boxes)  # [G, V]
        iou_cost = -torch.log(ious + 1e-7)
        num_classes = cls_logits.shape[1]
        onehot = F.one_hot(gt_labels.long(), num_classes).float()  # [G, C]
        soft = onehot[:, None, :] * ious[:, :, None]  # [G, V, C]
        logits = v_logits[None].expand(len(gt_boxes), -1, -1)
        scale = (soft - logits.sigmoid()).abs().pow(2)
        cls_cost = (F.binary_cross_entropy_with_logits(logits, soft, reduction="none") * scale).sum(
            -1
        )
        both = (in_box & in_center)[vidx].T  # [G, V]
        cost = cls_cost + self.iou_weight * iou_cost + (~both).float() * 1e5
        # dynamic k
        k = min(self.topk, ious.shape[1])
        dyn_k = torch.topk(ious, k, dim=1).values.sum(1).int().clamp(min=1)
        matching = torch.zeros_like(cost, dtype=torch.bool)
        for g in range(cost.shape[0]):
            idx = torch.topk(cost[g], int(dyn_k[g]), largest=False).indices
            matching[g, idx] = True
        multiple = matching.sum(0) > 1
        if multiple.any():
            best = cost[:, multiple].argmin(0)
            matching[:, multiple] = False
            matching[best, torch.nonzero(multiple).squeeze(1)] = True
        matched = matching.any(0)
        owner = matching.float().argmax(0)
        pos = vidx[matched]
        gt_index[pos] = owner[matched]
        ious_out[pos] = ious[owner[matched], torch.nonzero(matched).squeeze(1)].to(ious_out.dtype)
        return Assignment(gt_index, ious_out)
