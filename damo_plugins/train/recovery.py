"""Recovery after a pruning step: fine-tuning with the unpruned model as teacher.

Why a teacher: right after a step the pruned network still computes roughly what the
unpruned one did, minus what the removed channels carried; the detection loss alone on a few
hundred iterations pulls it towards the labels from a damaged starting point, while the
unpruned model's own outputs say, for every anchor, what it used to answer — dense targets
instead of a few positives per image. Three terms are added to the detection loss:

* **features**: the ``distill`` pass's loss on the three neck outputs (CWD by default, with
  1x1 align convs from the pruned widths to the teacher's, trained with the student and
  dropped afterwards), weight ``feature_weight`` decayed by a cosine to a tenth;
* **class scores**: binary KL between the teacher's and the student's sigmoid scores, per
  anchor and class, summed and normalised by the teacher's total top score (as QFL is by its
  positives), weight ``cls_weight``;
* **box distributions**: KL(teacher ‖ student) of the softmaxed DFL bins of each box side at
  temperature ``tau``, weighted per anchor by the teacher's top class score (box bins of
  background anchors mean nothing), weight ``box_weight``.

Schedule, made for recovery rather than training: every step restarts a short cosine cycle
(a *warm restart*: ``warmup_iters`` of linear warm-up, then cosine to ``min_lr_ratio``) at a
learning rate below the training one, and evaluates/keeps the EMA of the weights. ``finetune``
runs the same schedule without the teacher — the ablation baseline.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from damo_plugins.core.errors import DamoError


@dataclass
class RecoverySettings:
    """How one recovery run trains (JSON-able; the prune pass fills it from its config)."""

    mode: str = "distill"  # "finetune" | "distill"
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 16
    warmup_iters: int = 20
    min_lr_ratio: float = 0.05
    ema: bool = True
    feature_weight: float = 1.0
    cls_weight: float = 1.0
    box_weight: float = 1.0
    tau: float = 1.0
    feature_loss: str = "cwd"
    seed: int = 0
    max_iters: int | None = None  # cut each run short (tests, smoke runs)


@dataclass
class RecoveryResult:
    model: nn.Module
    seconds: float
    cpu_seconds: float
    iterations: int
    history: list[dict[str, Any]] = field(default_factory=list)


def binary_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Element-wise KL(Bernoulli(sigmoid t) ‖ Bernoulli(sigmoid s)), stable from logits.

    Zero where the two scores agree (unlike BCE with soft targets, whose minimum is the
    teacher's entropy), so the term reads as "how far from the teacher".
    """
    p = teacher_logits.sigmoid()
    return p * (F.logsigmoid(teacher_logits) - F.logsigmoid(student_logits)) + (1 - p) * (
        F.logsigmoid(-teacher_logits) - F.logsigmoid(-student_logits)
    )


def output_losses(
    student_raw: Sequence[torch.Tensor], teacher_raw: Sequence[torch.Tensor], tau: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(class-score KL, box-distribution KL) between two heads' raw outputs on one batch.

    Raw outputs as :meth:`forward_levels` returns them: class logits ``[N, A, C]`` and
    box-bin logits ``[N, A, 4, R+1]``; both heads must have the same anchors (same strides and
    input size) and classes.
    """
    s_cls, s_reg = student_raw[0].float(), student_raw[1].float()
    t_cls, t_reg = teacher_raw[0].detach().float(), teacher_raw[1].detach().float()
    if s_cls.shape != t_cls.shape or s_reg.shape != t_reg.shape:
        raise DamoError(
            f"student and teacher heads differ: {tuple(s_cls.shape)}/{tuple(s_reg.shape)} vs "
            f"{tuple(t_cls.shape)}/{tuple(t_reg.shape)}",
            "the teacher must be the same detector (classes, strides, box bins) at the same size",
        )
    weight = t_cls.sigmoid().max(-1).values  # [N, A]: how much the teacher sees an object
    norm = weight.sum().clamp(min=1.0)
    cls = binary_kl(s_cls, t_cls).sum() / norm
    t_logp = F.log_softmax(t_reg / tau, dim=-1)
    s_logp = F.log_softmax(s_reg / tau, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).sum(-1)  # [N, A], summed over 4 sides
    box = (kl * weight).sum() / norm * tau**2
    return cls, box


class RecoveryDistiller(nn.Module):
    """Feature align convs and the three distillation terms against a frozen teacher."""

    def __init__(
        self, student: nn.Module, teacher: nn.Module, size: int, settings: RecoverySettings
    ) -> None:
        from damo_plugins.train.distill import FeatureDistiller, feature_channels

        super().__init__()
        self.features = FeatureDistiller(
            feature_channels(student, size),
            feature_channels(teacher, size),
            settings.feature_loss,
            settings.tau,
        )
        self.settings = settings

    @torch.no_grad()
    def fit_align(self, student: nn.Module, teacher: nn.Module, images: torch.Tensor) -> None:
        """Start each align conv at the least-squares map from the student's features to the
        teacher's on one batch.

        Why: the pruned student's channels are a subset of the teacher's, so a good linear
        map exists from the first iteration; randomly initialised align convs would instead
        feed the student noise-driven feature gradients until they have been learnt.
        """
        was = student.training
        student.eval()
        s_feats, t_feats = student.features(images), teacher.features(images)
        student.train(was)
        for conv, s, t in zip(self.features.align, s_feats, t_feats):
            x = s.permute(0, 2, 3, 1).reshape(-1, s.shape[1]).double()
            y = t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).double()
            x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
            # a small ridge term keeps the solve stable when channels are (nearly) collinear
            reg = 1e-3 * torch.eye(x.shape[1], dtype=x.dtype) * x.pow(2).mean()
            sol = torch.linalg.solve(x.T @ x + reg, x.T @ y)  # [cs + 1, ct]
            conv.weight.copy_(sol[:-1].T.reshape(conv.weight.shape).to(conv.weight.dtype))
            conv.bias.copy_(sol[-1].to(conv.bias.dtype))

    def loss(
        self,
        student: nn.Module,
        teacher: nn.Module,
        feats: Sequence[torch.Tensor],
        images: torch.Tensor,
        progress: float,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        from damo_plugins.train.distill import loss_weight

        s = self.settings
        teacher.eval()  # frozen: its BN statistics never move
        with torch.no_grad():
            t_feats = teacher.features(images)
            t_raw = teacher.head.forward_levels(t_feats)
        total = feats[0].new_zeros(())
        parts: dict[str, float] = {}
        if s.feature_weight:
            f = self.features(feats, t_feats)
            total = total + s.feature_weight * loss_weight(progress) * f
            parts["kd_feat"] = float(f.detach())
        if s.cls_weight or s.box_weight:
            # the student's head on the features the loop already computed: two convs per
            # level, cheap next to the forward pass the loop would otherwise have to repeat
            s_raw = student.head.forward_levels(feats)
            cls, box = output_losses(s_raw, t_raw, s.tau)
            total = total + s.cls_weight * cls + s.box_weight * box
            parts["kd_cls"], parts["kd_box"] = float(cls.detach()), float(box.detach())
        return total, parts


def recover(
    model: nn.Module,
    teacher: nn.Module | None,
    train_set: Any,
    settings: RecoverySettings,
    log: Callable[[str], None] = print,
) -> RecoveryResult:
    """Fine-tune ``model`` (in place; its EMA weights are loaded back into it at the end)
    with the detection loss, plus the teacher's terms in ``distill`` mode."""
    from damo_plugins.train.loop import TrainConfig, fit

    if settings.mode not in ("finetune", "distill"):
        raise DamoError(f"unknown recovery mode {settings.mode!r}", "finetune or distill")
    if settings.mode == "distill" and teacher is None:
        raise DamoError("recovery by distillation needs the unpruned model as teacher")
    tcfg = TrainConfig(
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        warmup_iters=settings.warmup_iters,
        min_lr_ratio=settings.min_lr_ratio,
        ema=settings.ema,
        seed=settings.seed,
        eval_every=10**6,
        log_every=50,  # a long recovery says how it goes, not only once per epoch
    )
    train = train_set
    if settings.max_iters:
        train = _Limited(train_set, settings.max_iters * settings.batch_size)
    extra_loss = None
    distiller: RecoveryDistiller | None = None
    if settings.mode == "distill":
        assert teacher is not None
        teacher = teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        size = int(getattr(train_set, "img_size", 256))
        distiller = RecoveryDistiller(model, teacher, size, settings)
        if settings.feature_weight:
            from damo_plugins.data.coco import collate

            n = min(settings.batch_size, len(train))
            distiller.fit_align(model, teacher, collate([train[i] for i in range(n)])[0])

        def extra_loss(
            feats: tuple[torch.Tensor, ...], images: torch.Tensor, progress: float
        ) -> torch.Tensor:
            assert distiller is not None and teacher is not None
            return distiller.loss(model, teacher, feats, images, progress)[0]

    t0, c0 = time.perf_counter(), time.process_time()
    res = fit(
        model,
        train,
        tcfg,
        extra_loss=extra_loss,
        extra_modules=distiller,
        log=log,
    )
    # fit trains ``model`` in place and returns its EMA copy; carry the EMA weights over
    if res.model is not model:
        model.load_state_dict(res.model.state_dict())
    model.eval()
    return RecoveryResult(
        model,
        time.perf_counter() - t0,
        time.process_time() - c0,
        res.iterations,
        copy.deepcopy(res.history),
    )


class _Limited:
    """The first ``n`` samples of a data set (a recovery budget counted in iterations)."""

    def __init__(self, dataset: Any, n: int) -> None:
        self.dataset, self.n = dataset, min(n, len(dataset))

    @property
    def rng(self) -> Any:
        return self.dataset.rng

    @rng.setter
    def rng(self, value: Any) -> None:
        # the loop re-seeds augmentation per epoch: it must reach the wrapped data set
        self.dataset.rng = value

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if i >= self.n:
            raise IndexError(i)
        return self.dataset[i]

    def __getattr__(self, name: str) -> Any:  # img_size, rng, num_classes, ...
        return getattr(self.dataset, name)


@torch.no_grad()
def detection_loss(
    model: nn.Module, dataset: Any, limit: int | None = None, batch: int = 8
) -> float:
    """Mean detection loss (QFL + GIoU + DFL, training weights) on labelled images, eval mode.

    A smoother measure than mAP on a handful of images: every anchor and object contributes,
    where mAP at a few dozen images moves in steps of a detection.
    """
    from damo_plugins.data.coco import collate
    from damo_plugins.train.loop import raw_outputs
    from damo_plugins.train.losses import DetectionLoss

    was = model.training
    model.eval()
    fn = DetectionLoss(model.head.num_classes, model.head.reg_max)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    total, count = 0.0, 0
    try:
        for start in range(0, n, batch):
            images, targets, _ = collate([dataset[i] for i in range(start, min(n, start + batch))])
            _, raw = raw_outputs(model, images)
            loss, _ = fn(raw, targets)
            total += float(loss) * images.shape[0]
            count += images.shape[0]
    finally:
        model.train(was)
    return total / max(count, 1)
