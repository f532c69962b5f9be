"""``prune``: structured channel pruning — whole filters removed, a smaller dense model out.

NNCF 3.x dropped filter pruning, so this pass uses the dependency graph of `torch-pruning`
(``torch_pruning.pruner.MetaPruner``): it traces the model once and groups every tensor
dimension that must shrink together — the two branches of a RepConv and their sum, residual
adds, CSP concatenations (indices shift per concatenated input), the convs that read a neck
output, depthwise groups — so removing channel *c* of a group removes it everywhere it is
coupled. The head's final convs (``gfl_cls``/``gfl_reg``) keep their outputs (classes and
box bins), as does anything listed in ``ignore``.

Importance: L1 or L2 norm of each group's weights, BN scale (``|gamma|``), or first-order
Taylor (``|w * dL/dw|`` summed over the group, Molchanov et al.) from the detection loss on a
few training batches. Why Taylor exists here: on a small trained DAMO-YOLO the filter norms
are nearly equal (weight decay evens them out; the weakest channel of a group is typically at
~0.9x the median), so norms hardly tell which channel matters — removing 10 % of channels by
L1 took the shipped nano model from 0.44 to 0.06 mAP, by BN scale to 0.12, by Taylor (global)
to 0.39-0.41 (``docs/benchmarks/training.md``). ``auto`` (default) picks Taylor when ``data`` is given and
the model is a DAMO-YOLO detector, else BN scale when the model has trained BatchNorm
scales, else L1.

Coupling is verified, not assumed: ``tests/test_prune.py`` zeroes each group's channel in one
copy and removes it in another and checks both give the same outputs, for every group. Ratio:
``uniform`` removes ``ratio`` of each group's channels, ``global`` ranks groups across the
model (capped at 90 % per layer so no layer disappears). ``steps > 1`` prunes in increments,
optionally fine-tuning after each step (``finetune_epochs``, ``lr``, ``data``).

Rebuilding a saved pruned model: the pass records, per module whose shapes changed, the new
shapes of its parameters and buffers plus its integer size attributes (``in_channels``,
``out_channels``, ``num_features``, ...). :meth:`PrunePass.replay` applies exactly that to a
freshly built model, so ``load_state_dict`` then fills in the weights (weights_only
checkpoints; no pickled modules).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from damo_plugins.core.artifact import ModelArtifact
from damo_plugins.core.errors import DamoError
from damo_plugins.core.hookspecs import hookimpl
from damo_plugins.core.passes import Pass, PassConfig, PassContext
from damo_plugins.core.verify import Verification

if TYPE_CHECKING:  # torch and torch-pruning load only when a prune step runs
    from torch import nn


class PruneConfig(PassConfig):
    ratio: float = Field(0.3, gt=0, lt=1, description="fraction of prunable channels to remove")
    importance: Literal["auto", "l1", "l2", "bn", "taylor"] = Field(
        "auto", description="auto: taylor with data and a detector, else bn, else l1"
    )
    scope: Literal["uniform", "global"] = "uniform"
    steps: int = Field(1, ge=1, le=20, description="iterative pruning steps")
    round_to: int | None = Field(None, ge=1, description="keep channel counts multiples of this")
    ignore: list[str] = Field(
        default_factory=list, description="module names never pruned (outputs)"
    )
    finetune_epochs: int = Field(0, ge=0, description="fine-tuning epochs after each step")
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    data: str | None = Field(None, description="data folder (train/ + train.json, val/ + val.json)")
    img_size: int | None = Field(
        None, description="training/eval size (default: the model's input)"
    )
    eval_limit: int | None = Field(None, ge=1, description="validation images used for mAP")
    taylor_images: int = Field(
        64, ge=1, description="training images whose loss gradients rank channels (taylor)"
    )


class PrunePass(Pass):
    """Structured channel pruning with optional fine-tuning."""

    name = "prune"
    accepts = ("torch",)
    Config = PruneConfig
    description = (
        "structured channel pruning (torch-pruning dependency graph), optional fine-tuning"
    )

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        import torch

        from damo_plugins.train.prune import (
            accumulate_gradients,
            build_pruner,
            channel_count,
            default_ignored,
            resolve_importance,
            shape_record,
            sync_size_attrs,
        )

        cfg: PruneConfig = self.config  # type: ignore[assignment]
        if not artifact.inputs:
            raise DamoError(
                "prune needs the model's input shape", "give input_shape / --input-shape"
            )
        original = artifact.model
        model = copy.deepcopy(original).eval()
        shape = artifact.inputs[0].concrete()
        example = torch.zeros([1, *shape[1:]])
        ignored = default_ignored(model, cfg.ignore)
        importance = resolve_importance(cfg, model)
        before_channels = channel_count(model, ignored)
        before = artifact.summary()
        data = _data(cfg, shape, ctx)
        metrics: dict[str, Any] = {
            "params_before": before["params"],
            "flops_before": before["flops"],
            "importance": importance,
            "scope": cfg.scope,
        }
        if data is not None:
            metrics["mAP_before"] = _map(model, data[1], cfg)
        pruner = build_pruner(model, example, cfg, ignored, importance)
        for step in range(cfg.steps):
            if importance == "taylor":
                assert data is not None  # resolve_importance checked
                accumulate_gradients(model, data[0], cfg.taylor_images, cfg.batch_size)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pruner.step()
            model.zero_grad(set_to_none=True)
            sync_size_attrs(model)
            if data is not None and cfg.finetune_epochs:
                if step == cfg.steps - 1:
                    metrics["mAP_pruned"] = _map(model, data[1], cfg)
                model = _finetune(model, data, cfg, ctx, step)
                sync_size_attrs(model)
        model.eval()
        after_channels = channel_count(model, ignored)
        if after_channels == before_channels:
            raise DamoError(
                f"prune: no channel could be removed at ratio {cfg.ratio}",
                "raise the ratio, or check 'ignore' and the importance",
            )
        record = {"changes": shape_record(original, model)}
        out = artifact.derive(model=model)
        if out.arch is not None:
            out.arch.setdefault("transforms", []).append({"pass": self.name, "record": record})
        summary = out.summary()
        metrics.update(
            {
                "params_after": summary["params"],
                "flops_after": summary["flops"],
                "channels_before": before_channels,
                "channels_after": after_channels,
                "channels_removed": round(1 - after_channels / max(before_channels, 1), 4),
            }
        )
        if data is not None:
            key = "mAP_finetuned" if cfg.finetune_epochs else "mAP_pruned"
            metrics[key] = _map(model, data[1], cfg)
        ctx.extra.update(metrics)
        out.meta["prune"] = metrics
        return out

    def verify(self, before: ModelArtifact, after: ModelArtifact, ctx: PassContext) -> Verification:
        """Pruning changes the numbers on purpose: check the pruned model runs, keeps its
        output shapes, and lost about ``ratio`` of its prunable channels."""
        import torch

        cfg: PruneConfig = self.config  # type: ignore[assignment]
        feeds = before.example_inputs(seed=ctx.seed)
        ref = before.run(feeds, ctx.manager)
        out = after.run(feeds, ctx.manager)
        shapes_ok = [r.shape for r in ref] == [o.shape for o in out]
        finite = all(bool(torch.isfinite(torch.from_numpy(o)).all()) for o in out)
        meta = after.meta.get("prune", {})
        removed = float(meta.get("channels_removed", 0.0))
        ok = shapes_ok and finite and removed > 0
        msg = (
            f"removed {removed:.1%} of prunable channels (asked {cfg.ratio:.0%}); params "
            f"{meta.get('params_before')} -> {meta.get('params_after')}; outputs "
            f"{'keep their shapes' if shapes_ok else 'CHANGED SHAPE'}{'' if finite else ', NOT FINITE'}"
        )
        return Verification(ok, {k: v for k, v in meta.items()}, msg)

    @classmethod
    def replay(cls, module: Any, record: dict[str, Any]) -> Any:
        from damo_plugins.train.prune import apply_shapes, sync_size_attrs

        model = apply_shapes(module, record.get("changes") or {})
        sync_size_attrs(model)
        return model


def _data(cfg: PruneConfig, shape: list[int], ctx: PassContext) -> tuple[Any, Any] | None:
    if cfg.data is None:
        if cfg.finetune_epochs:
            raise DamoError(
                "prune: fine-tuning needs data",
                "give data: <folder> (train/ + train.json, val/ + val.json)",
            )
        return None
    from damo_plugins.train.trainer import data_splits

    size = cfg.img_size or int(shape[-1])
    return data_splits(Path(cfg.data), size, seed=ctx.seed)


def _map(model: nn.Module, val_set: Any, cfg: PruneConfig) -> float:
    from damo_plugins.data.evaluate import evaluate

    return round(evaluate(model, val_set, limit=cfg.eval_limit)["mAP"], 4)


def _finetune(
    model: nn.Module, data: tuple[Any, Any], cfg: PruneConfig, ctx: PassContext, step: int
) -> nn.Module:
    from damo_plugins.train.loop import TrainConfig, fit

    tcfg = TrainConfig(
        epochs=cfg.finetune_epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup_iters=50,
        seed=ctx.seed + step,
        eval_every=10**6,
    )
    res = fit(model, data[0], tcfg, log=lambda s: ctx.log(f"  prune fine-tune: {s}"))
    # fit trains ``model`` in place and returns its EMA copy; carry the EMA weights over
    model.load_state_dict(res.model.state_dict())
    return model


@hookimpl
def damo_passes() -> list[type[Pass]]:
    return [PrunePass]
