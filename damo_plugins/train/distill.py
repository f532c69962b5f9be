"""``distill``: train the model (the student) with feature distillation from a teacher.

DAMO-YOLO's recipe, on the three neck outputs (strides 8, 16, 32):

* per level a 1x1 conv with bias maps the student's channels to the teacher's (the *align*
  convs; trained with the student, dropped from the exported model);
* both maps are normalised by an affine-free batch norm (batch statistics), so the loss
  compares feature *patterns*, not scales the two networks need not share;
* **CWD** (channel-wise distillation, the default): each channel becomes a distribution over
  its H·W positions (softmax with temperature τ = 1) and the loss is
  KL(teacher ‖ student)·τ² divided by C·N, summed over levels. ``loss: mse`` uses the mean
  squared error of the normalised maps instead;
* the loss weight decays with a cosine from 1.0 to 0.1 over training, so the detection loss
  dominates at the end;
* the teacher is frozen and in eval mode throughout (its BN statistics never move).

The teacher is any model with the same strides: a registered builder (with
``teacher_args``) or a checkpoint (typically a bigger model trained with ``damo-opt train``).
``baseline: true`` also trains the same student alone with the same schedule and seed and
reports the mAP gain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from damo_plugins.core.errors import DamoError


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Affine-free batch norm with the batch's own statistics."""
    return F.batch_norm(x, None, None, training=True, eps=1e-5)


def cwd_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Channel-wise distillation: KL(teacher ‖ student) of per-channel spatial softmaxes, ·τ²/(C·N)."""
    n, c, h, w = student.shape
    s = student.reshape(n * c, h * w) / tau
    t = teacher.reshape(n * c, h * w) / tau
    kl = (F.softmax(t, dim=1) * (F.log_softmax(t, dim=1) - F.log_softmax(s, dim=1))).sum()
    return kl * tau**2 / (c * n)


def mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student, teacher)


class FeatureDistiller(nn.Module):
    """Align convs + the feature loss over levels (a module, so its convs are trainable)."""

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        loss: str = "cwd",
        tau: float = 1.0,
    ) -> None:
        super().__init__()
        if len(student_channels) != len(teacher_channels):
            raise DamoError(
                f"student has {len(student_channels)} feature levels, teacher {len(teacher_channels)}",
                "distil between models with the same neck levels",
            )
        self.align = nn.ModuleList(
            nn.Conv2d(cs, ct, 1, bias=True) for cs, ct in zip(student_channels, teacher_channels)
        )
        self.loss, self.tau = loss, tau

    def forward(
        self, student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        total = student_feats[0].new_zeros(())
        for conv, s, t in zip(self.align, student_feats, teacher_feats):
            if s.shape[-2:] != t.shape[-2:]:
                raise DamoError(
                    f"student and teacher feature maps differ in size: {tuple(s.shape)} vs {tuple(t.shape)}",
                    "the teacher must use the same strides and input size",
                )
            s_n, t_n = normalize(conv(s)), normalize(t.detach())
            total = total + (
                cwd_loss(s_n, t_n, self.tau) if self.loss == "cwd" else mse_loss(s_n, t_n)
            )
        return total


def loss_weight(progress: float, start: float = 1.0, end: float = 0.1) -> float:
    """Cosine decay from ``start`` (progress 0) to ``end`` (progress 1)."""
    p = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * p))


def feature_channels(model: nn.Module, size: int) -> list[int]:
    was = model.training
    model.eval()
    with torch.no_grad():
        feats = model.features(torch.zeros(1, 3, size, size))
    model.train(was)
    return [int(f.shape[1]) for f in feats]


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train_set: Any,
    train_config: Any,
    *,
    loss: str = "cwd",
    tau: float = 1.0,
    weight: tuple[float, float] = (1.0, 0.1),
    val_set: Any = None,
    log: Any = print,
) -> tuple[nn.Module, FeatureDistiller, Any]:
    """Train ``student`` (in place) with the detection loss plus the feature loss.

    Returns (EMA student in eval mode, the distiller with its align convs, the fit result).
    """
    from damo_plugins.train.loop import fit

    for m in (student, teacher):
        if not hasattr(m, "features"):
            raise DamoError(
                f"{type(m).__name__} has no neck features to distil", "use DAMO-YOLO models"
            )
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    size = int(getattr(train_set, "img_size", 256))
    distiller = FeatureDistiller(
        feature_channels(student, size), feature_channels(teacher, size), loss, tau
    )

    def extra(feats: Sequence[torch.Tensor], images: torch.Tensor, progress: float) -> torch.Tensor:
        teacher.eval()  # frozen: never let its BN statistics move
        with torch.no_grad():
            t_feats = teacher.features(images)
        return loss_weight(progress, *weight) * distiller(feats, t_feats)

    res = fit(
        student,
        train_set,
        train_config,
        val_set=val_set,
        extra_loss=extra,
        extra_modules=distiller,
        log=log,
    )
    return res.model, distiller, res
