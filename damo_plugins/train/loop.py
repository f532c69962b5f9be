"""The training loop: optimiser, warm-up + cosine schedule, EMA, checkpoints, resume.

:func:`fit` trains any module shaped like our DAMO-YOLO (``features(images)`` and
``head.forward_levels(features)``), so the ``distill`` and ``prune`` passes reuse it — the
former adds its feature loss through ``extra_loss``, the latter fine-tunes a pruned model.

Choices, for CPU training of small models in minutes rather than days:

* **AdamW** (lr 2e-3, weight decay 0.05, none on BN/bias/scale parameters) by default — it
  converges in far fewer steps than DAMO-YOLO's SGD (lr 0.01 for batch 64, momentum 0.9,
  wd 5e-4, still available with ``optimizer="sgd"``), which matters at a few thousand steps;
* linear warm-up, then cosine decay to ``min_lr_ratio`` x lr, per iteration;
* an **EMA** of the weights (decay ramped up as ``decay * (1 - exp(-updates / 200))``, as in
  YOLOX/DAMO) is what gets evaluated and exported;
* checkpoints at every epoch end. ``last.pt`` holds the damo-plugins checkpoint of the EMA
  model (so ``damo-opt`` loads it like any model) plus a ``train_state`` (raw weights,
  optimiser, epoch, history) for resuming; ``best.pt`` only the EMA model. Everything is
  tensors and plain values: ``torch.load(..., weights_only=True)`` reads them;
* the shuffling and augmentation streams are re-seeded from ``(seed, epoch)`` at every
  epoch, so a run resumed at an epoch boundary continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from damo_plugins.core.errors import DamoError
from damo_plugins.core.io import atomic_path, write_text
from damo_plugins.train.losses import DetectionLoss

CHECKPOINT_KEY = "damo_plugins_checkpoint"


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`fit` (all JSON-able; stored in checkpoints)."""

    epochs: int = 10
    batch_size: int = 16
    lr: float = 2e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.05
    momentum: float = 0.9
    warmup_iters: int = 300
    min_lr_ratio: float = 0.05
    ema_decay: float = 0.999
    ema: bool = True
    grad_clip: float = 10.0
    seed: int = 0
    eval_every: int = 1
    eval_limit: int | None = None
    max_minutes: float | None = None
    progress: bool = False
    log_every: int = 0  # also log the running loss every N iterations (0: per epoch only)

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise DamoError("epochs and batch size must be at least 1")
        if not self.lr > 0:
            raise DamoError(f"learning rate must be positive, got {self.lr}")
        if self.optimizer not in ("adamw", "sgd"):
            raise DamoError(f"unknown optimizer {self.optimizer!r}", "adamw or sgd")


@dataclass
class FitResult:
    model: nn.Module  # the EMA model (or the raw one without EMA), eval mode
    history: list[dict[str, Any]] = field(default_factory=list)
    best_map: float = -1.0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # CPU time of this process (the work done; wall clock adds waiting)
    iterations: int = 0


class ModelEMA:
    """Exponential moving average of a model's floating-point state (weights and BN stats)."""

    def __init__(
        self, model: nn.Module, decay: float = 0.999, tau: float = 200.0, updates: int = 0
    ) -> None:
        self.ema = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        msd = model.state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach(), alpha=1 - d)
            else:
                v.copy_(msd[k])


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only (not on BN, biases or scalar scales)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() > 1 and not name.endswith(".bias") else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_at(it: int, total: int, cfg: TrainConfig) -> float:
    warm = min(cfg.warmup_iters, max(total // 5, 1))
    if it < warm:
        return cfg.lr * (it + 1) / warm
    t = (it - warm) / max(total - warm, 1)
    low = cfg.lr * cfg.min_lr_ratio
    return low + (cfg.lr - low) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def raw_outputs(
    model: nn.Module, images: torch.Tensor
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(neck features, raw head outputs) of a DAMO-YOLO-shaped model."""
    if not hasattr(model, "features") or not hasattr(
        getattr(model, "head", None), "forward_levels"
    ):
        raise DamoError(
            f"cannot train a {type(model).__name__}: training needs a DAMO-YOLO model",
            "use a damo-yolo-* builder or a checkpoint of one",
        )
    feats = model.features(images)
    return feats, model.head.forward_levels(feats)


def save_checkpoint(
    path: Path,
    model: nn.Module,
    arch: Mapping[str, Any] | None,
    input_shape: list[int],
    meta: Mapping[str, Any],
    train_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write a damo-plugins checkpoint (weights_only-loadable), optionally with train state."""
    payload: dict[str, Any] = {
        CHECKPOINT_KEY: 1,
        "arch": copy.deepcopy(dict(arch)) if arch is not None else None,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "inputs": [{"name": "images", "shape": list(input_shape), "dtype": "float32"}],
        "outputs": [
            {"name": "scores", "shape": [input_shape[0], -1, -1], "dtype": "float32"},
            {"name": "boxes", "shape": [input_shape[0], -1, 4], "dtype": "float32"},
        ],
        "meta": json.loads(json.dumps(dict(meta), default=str)),
    }
    if train_state is not None:
        payload["train_state"] = dict(train_state)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_train_state(path: str | Path) -> dict[str, Any]:
    """The ``train_state`` of a ``last.pt`` (weights_only)."""
    from damo_plugins.core.io import check_input_file

    p = check_input_file(path, "checkpoint")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DamoError(f"cannot resume from {p}: {type(exc).__name__}: {str(exc)[:160]}") from exc
    if not isinstance(payload, Mapping) or "train_state" not in payload:
        raise DamoError(f"{p} holds no training state", "resume from the last.pt of a training run")
    return dict(payload["train_state"])


def _seed_epoch(dataset: Any, seed: int, epoch: int) -> torch.Generator:
    if hasattr(dataset, "rng"):
        dataset.rng = np.random.default_rng([seed, epoch])
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def fit(
    model: nn.Module,
    train_set: Any,
    cfg: TrainConfig,
    *,
    val_set: Any = None,
    output: str | Path | None = None,
    arch: Mapping[str, Any] | None = None,
    resume: Mapping[str, Any] | None = None,
    extra_loss: Callable[[tuple[torch.Tensor, ...], torch.Tensor, float], torch.Tensor]
    | None = None,
    extra_modules: nn.Module | None = None,
    log: Callable[[str], None] = print,
) -> FitResult:
    """Train ``model`` in place on ``train_set`` (a :class:`CocoDetection` with ``augment``).

    ``extra_loss(features, images, progress)`` adds a term (``progress`` runs 0 -> 1 over
    training); ``extra_modules`` are trained with the model but not part of it (distillation's
    align convs). ``resume`` is a ``train_state`` from :func:`load_train_state`.
    Returns the EMA model (eval mode) and per-epoch history.
    """
    from damo_plugins.data.coco import collate
    from damo_plugins.data.evaluate import evaluate

    cfg.validate()
    torch.manual_seed(cfg.seed)
    out = Path(output) if output is not None else None
    head = model.head
    loss_fn = DetectionLoss(head.num_classes, head.reg_max)
    groups = param_groups(model, cfg.weight_decay)
    if extra_modules is not None:
        groups += param_groups(extra_modules, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))
    else:
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    ema = ModelEMA(model, cfg.ema_decay) if cfg.ema else None
    start_epoch, it, history, best = 0, 0, [], -1.0
    if resume:
        model.load_state_dict(resume["model"])
        if ema is not None and resume.get("ema") is not None:
            ema.ema.load_state_dict(resume["ema"])
            ema.updates = int(resume.get("ema_updates", 0))
        if extra_modules is not None and resume.get("extra") is not None:
            extra_modules.load_state_dict(resume["extra"])
        opt.load_state_dict(resume["optimizer"])
        start_epoch, it = int(resume["epoch"]), int(resume["iteration"])
        history = [dict(h) for h in resume.get("history", [])]
        best = float(resume.get("best_map", -1.0))
        if start_epoch >= cfg.epochs:
            log(f"already trained for {start_epoch} epochs")
    size = int(getattr(train_set, "img_size", 320))
    t_start, c_start = time.perf_counter(), time.process_time()
    deadline = t_start + cfg.max_minutes * 60 if cfg.max_minutes else None
    stopped = False
    progress = _progress(cfg.progress)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        gen = _seed_epoch(train_set, cfg.seed, epoch)
        order = torch.randperm(len(train_set), generator=gen).tolist()
        sums: dict[str, float] = {}
        t_epoch, c_epoch = time.perf_counter(), time.process_time()
        task = (
            progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=steps_per_epoch)
            if progress
            else None
        )
        for step in range(steps_per_epoch):
            batch = [
                train_set[i] for i in order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            ]
            images, targets, _ = collate(batch)
            lr = lr_at(it, total, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            feats, raw = raw_outputs(model, images)
            loss, parts = loss_fn(raw, targets)
            if extra_loss is not None:
                extra = extra_loss(feats, images, it / max(total - 1, 1))
                parts["extra"] = float(extra.detach())
                loss = loss + extra
            if not torch.isfinite(loss):
                raise DamoError(
                    f"training diverged at iteration {it} (loss {float(loss)})", "lower --lr"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                params = [p for g in opt.param_groups for p in g["params"]]
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            if ema is not None:
                ema.update(model)
            it += 1
            parts["loss"] = float(loss.detach())
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if progress is not None:
                progress.update(
                    task,
                    advance=1,
                    description=(
                        f"epoch {epoch + 1}/{cfg.epochs} loss {sums['loss'] / (step + 1):.3f} lr {lr:.2e}"
                    ),
                )
            if cfg.log_every and it % cfg.log_every == 0:
                log(
                    f"  it {it} loss {sums['loss'] / (step + 1):.4f} lr {lr:.2e} "
                    f"{(time.perf_counter() - t_epoch) / (step + 1):.2f}s/it"
                )
            if deadline is not None and time.perf_counter() > deadline:
                stopped = True
                break
        done = step + 1
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "iterations": it,
            "lr": lr,
            "seconds": round(time.perf_counter() - t_epoch, 1),
            "cpu_seconds": round(time.process_time() - c_epoch, 1),
        }
        record.update({k: round(v / done, 4) for k, v in sums.items()})
        if done < steps_per_epoch:
            record["partial"] = True
        eval_model = ema.ema if ema is not None else model
        last = epoch + 1 == cfg.epochs or stopped
        if val_set is not None and ((epoch + 1) % cfg.eval_every == 0 or last):
            metrics = evaluate(eval_model, val_set, limit=cfg.eval_limit)
            record.update({k: round(v, 4) for k, v in metrics.items() if k in ("mAP", "mAP50")})
        history.append(record)
        log("  ".join(f"{k} {v}" for k, v in record.items()))
        if out is not None:
            state = {
                "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "ema": ema.ema.state_dict() if ema is not None else None,
                "ema_updates": ema.updates if ema is not None else 0,
                "extra": extra_modules.state_dict() if extra_modules is not None else None,
                "optimizer": opt.state_dict(),
                # an epoch cut short by max_minutes is redone from its start on resume
                "epoch": epoch + 1 if done == steps_per_epoch else epoch,
                "iteration": it if done == steps_per_epoch else epoch * steps_per_epoch,
                "history": history,
                "best_map": best,
                "config": asdict(cfg),
            }
            meta = {
                "epoch": epoch + 1,
                "train_config": asdict(cfg),
                **{k: record[k] for k in ("mAP", "mAP50") if k in record},
            }
            if "mAP" in record and record["mAP"] > best:
                best = record["mAP"]
                state["best_map"] = best
                save_checkpoint(out / "best.pt", eval_model, arch, [1, 3, size, size], meta)
            save_checkpoint(out / "last.pt", eval_model, arch, [1, 3, size, size], meta, state)
            write_text(out / "history.json", json.dumps(history, indent=1))
        elif "mAP" in record:
            best = max(best, record["mAP"])
        if stopped:
            log(f"stopped after {cfg.max_minutes} minutes (epoch {epoch + 1}, iteration {it})")
            break
    if progress is not None:
        progress.stop()
    final = (ema.ema if ema is not None else model).eval()
    return FitResult(
        final, history, best, time.perf_counter() - t_start, time.process_time() - c_start, it
    )


def _progress(enabled: bool) -> Any:
    if not enabled:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    p = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
    )
    p.start()
    return p
