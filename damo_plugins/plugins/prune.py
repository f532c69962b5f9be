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
model (capped at 90 % per layer so no layer disappears). ``steps > 1`` prunes in increments.

Targets: ``ratio`` (channels) or ``flops`` (the fraction of FLOPs to remove, what latency
follows). For ``flops`` every step searches the channel ratio — or, with sensitivity, the
scale of the per-block ratios — whose pruned copy has ``1 - flops * step / steps`` of the
FLOPs (counted from weight shapes, equal to ``torch.utils.flop_counter``; regula falsi on
sqrt(FLOPs), 2-4 trials); the run fails with one line if the result misses ``flops`` by
more than ``flops_tolerance``. The report states FLOPs and params *actually* removed, both
counted on the result.

``candidates: N`` (Taylor, a FLOPs budget): right after a cut the converged embedded model
keeps anywhere from 0.06 to 0.15 mAP depending only on which augmentations of the 64 Taylor
images ranked its channels (six seeds, ``docs/benchmarks/training.md``), and the three
recoveries of that cut lost held-out mAP in the order of what their copy kept (0.150 ->
-0.74, 0.110 -> -1.31, 0.057 -> -1.71 points; their control mAPs were not so ordered). So
each step ranks ``N`` times, each on its own augmentation stream (the first is the one a
single ranking uses), prunes each copy to the budget, measures it on the ``eval_limit``
control images and recovers only the best — about 16 s per candidate, against minutes per
recovery epoch. Three recoveries are a hint, not proof: the option is off by default.

``allocation: sensitivity`` (:mod:`damo_plugins.train.sensitivity`): the mAP cost of
pruning each block (backbone stage, neck block) alone on ``sensitivity_images`` control
images, cached under a content hash, turned into per-block ratios that prune sensitive blocks
less while the FLOPs budget (``flops``, or what ``ratio`` would remove uniformly) is met.

Recovery after each step (:mod:`damo_plugins.train.recovery`): ``distill`` (the default
when ``data`` and ``finetune_epochs`` are given) fine-tunes with the *unpruned* model as
teacher — neck-feature CWD plus KL on the head's class scores and DFL box distributions —
on a short warm-restarted cosine cycle at a low learning rate with EMA; ``finetune`` is the
same schedule without the teacher (the ablation's baseline). The report gives mAP before,
right after the last step and after its recovery (on the first ``eval_limit`` val images),
and the CPU seconds of recovery.

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
from damo_plugins.core.passes import ConfigError, Pass, PassConfig, PassContext
from damo_plugins.core.verify import Verification

if TYPE_CHECKING:  # torch and torch-pruning load only when a prune step runs
    from torch import nn


class PruneConfig(PassConfig):
    ratio: float = Field(0.3, gt=0, lt=1, description="fraction of prunable channels to remove")
    flops: float | None = Field(
        None, gt=0, lt=1, description="fraction of FLOPs to remove (instead of ratio)"
    )
    flops_tolerance: float = Field(
        0.02, gt=0, lt=0.5, description="allowed |FLOPs removed - flops| (absolute fraction)"
    )
    allocation: Literal["uniform", "sensitivity"] = Field(
        "uniform",
        description="uniform: one ratio for every group; sensitivity: per-block ratios from "
        "the mAP cost of pruning each block alone (needs data)",
    )
    importance: Literal["auto", "l1", "l2", "bn", "taylor"] = Field(
        "auto", description="auto: taylor with data and a detector, else bn, else l1"
    )
    scope: Literal["uniform", "global"] = "uniform"
    steps: int = Field(1, ge=1, le=20, description="iterative pruning steps")
    round_to: int | None = Field(
        None,
        ge=1,
        description="keep channel counts multiples of this; 8 for OpenVINO on an AVX2 CPU, "
        "whose f32 kernels work in blocks of 8 channels (free counts removed 26-32 percent of the "
        "FLOPs for a 0.96-1.09x speed-up, multiples of 8 for 1.24-1.33x: docs/benchmarks/"
        "training.md)",
    )
    ignore: list[str] = Field(
        default_factory=list, description="module names never pruned (outputs)"
    )
    recovery: Literal["auto", "none", "finetune", "distill"] = Field(
        "auto",
        description="after each step: distill = fine-tune with the unpruned model as teacher, "
        "finetune = without it; auto = distill when data and finetune_epochs are given",
    )
    finetune_epochs: int = Field(0, ge=0, description="recovery epochs after each step")
    recovery_iters: int | None = Field(
        None, ge=1, description="at most this many recovery iterations per epoch (smoke runs)"
    )
    lr: float = Field(
        2e-4,
        gt=0,
        description="recovery learning rate: a tenth of training's (AdamW at 1e-3 raised a "
        "recovered model's held-out loss above the pruned one's in a few dozen iterations)",
    )
    warmup_iters: int = Field(20, ge=0, description="warm-up of each step's cosine cycle")
    ema: bool = Field(True, description="keep the EMA of the recovering weights")
    feature_weight: float = Field(1.0, ge=0, description="neck-feature (CWD) loss weight")
    cls_weight: float = Field(1.0, ge=0, description="class-score KL weight")
    box_weight: float = Field(1.0, ge=0, description="box-bin (DFL) KL weight")
    distill_tau: float = Field(1.0, gt=0, description="temperature of the box and CWD softmaxes")
    batch_size: int = Field(16, ge=1)
    data: str | None = Field(None, description="data folder (train/ + train.json, val/ + val.json)")
    img_size: int | None = Field(
        None, description="training/eval size (default: the model's input)"
    )
    eval_limit: int | None = Field(
        None, ge=1, description="control images (first of val) the mAPs are measured on"
    )
    taylor_images: int = Field(
        64, ge=1, description="training images whose loss gradients rank channels (taylor)"
    )
    candidates: int = Field(
        1,
        ge=1,
        le=16,
        description="taylor rankings per step, each from its own augmentation of the "
        "taylor_images; the pruned copy keeping the most control mAP is recovered",
    )
    sensitivity_ratio: float = Field(
        0.3, gt=0, lt=1, description="ratio each block is pruned at, alone, to measure it"
    )
    sensitivity_images: int = Field(32, ge=1, description="control images of the analysis")
    sensitivity_strength: float = Field(
        0.8, ge=0, le=1, description="the most sensitive block gets (1 - this) of the ratio"
    )
    cache_dir: str | None = Field(
        None, description="sensitivity cache (default $XDG_CACHE_HOME/damo-plugins/sensitivity)"
    )

    def resolved_recovery(self) -> str:
        """The recovery actually run: ``auto`` means distill whenever there is something to
        recover with (data and epochs), else none."""
        if self.recovery != "auto":
            return self.recovery
        return "distill" if self.data is not None and self.finetune_epochs else "none"

    def check(self) -> None:
        """Combinations pydantic cannot see, each as one line located at its option — run
        when a recipe is loaded (``validate_config``), so ``--dry-run`` reports them."""
        if self.flops is not None and "ratio" in self.model_fields_set:
            raise ConfigError(
                ["flops"],
                "prune: give either ratio (channels) or flops (FLOPs removed), not both",
                "flops: 0.3 removes 30 % of the FLOPs; ratio: 0.3 30 % of the channels",
            )
        rec = self.resolved_recovery()
        if rec != "none" and self.data is None:
            raise ConfigError(
                ["recovery"],
                f"prune: recovery ({rec}) needs data",
                "give data: <folder> (train/ + train.json, val/ + val.json)",
            )
        if rec != "none" and not self.finetune_epochs:
            raise ConfigError(
                ["recovery"],
                f"prune: recovery {rec} needs finetune_epochs >= 1",
                "or recovery: none",
            )
        if self.finetune_epochs and self.data is None:
            raise ConfigError(
                ["finetune_epochs"],
                "prune: fine-tuning needs data",
                "give data: <folder> (train/ + train.json, val/ + val.json)",
            )
        if self.candidates > 1:
            if self.importance in ("l1", "l2", "bn"):
                raise ConfigError(
                    ["candidates"],
                    f"prune: candidates differ only in the Taylor images' augmentation; "
                    f"importance '{self.importance}' ranks every candidate the same",
                    "use importance: taylor (or auto), or candidates: 1",
                )
            if self.data is None:
                raise ConfigError(
                    ["candidates"],
                    "prune: candidates are ranked by Taylor importance and chosen by control "
                    "mAP: both need data",
                    "give data: <folder>, or candidates: 1",
                )
            if self.flops is None and self.allocation == "uniform":
                raise ConfigError(
                    ["candidates"],
                    "prune: candidates are compared at one FLOPs budget: give flops (or "
                    "allocation: sensitivity)",
                    "flops: 0.3 removes 30 % of the FLOPs",
                )
        if self.allocation == "sensitivity":
            if self.data is None:
                raise ConfigError(
                    ["allocation"],
                    "prune: allocation 'sensitivity' needs data (it measures mAP per block)",
                    "give data: <folder>, or allocation: uniform",
                )
            if self.scope == "global":
                raise ConfigError(
                    ["allocation"],
                    "prune: allocation 'sensitivity' sets a ratio per block; scope 'global' "
                    "would rank across blocks and ignore them",
                    "drop scope: global",
                )


class PrunePass(Pass):
    """Structured channel pruning, recovered by fine-tuning with the unpruned model as teacher."""

    name = "prune"
    accepts = ("torch",)
    Config = PruneConfig
    description = (
        "structured channel pruning (torch-pruning dependency graph) to a channel or FLOPs "
        "target, sensitivity-driven ratios, recovery distilled from the unpruned model"
    )

    @classmethod
    def validate_config(cls, options: Any, manager: Any = None) -> PassConfig:
        cfg = super().validate_config(options, manager)
        cfg.check()  # type: ignore[attr-defined]
        return cfg

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        import torch

        from damo_plugins.train.prune import (
            accumulate_gradients,
            build_pruner,
            channel_count,
            conv_flops,
            conv_shapes,
            default_ignored,
            resolve_importance,
            shape_record,
            sync_size_attrs,
        )

        cfg: PruneConfig = self.config  # type: ignore[assignment]
        cfg.check()
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
        if cfg.candidates > 1 and importance != "taylor":
            raise DamoError(
                f"prune: candidates need Taylor importance; 'auto' chose '{importance}' for "
                f"this {type(model).__name__}",
                "candidates: 1",
            )
        before_channels = channel_count(model, ignored)
        before = artifact.summary()
        data = _data(cfg, shape, ctx)
        recovery = cfg.resolved_recovery()
        metrics: dict[str, Any] = {
            "params_before": before["params"],
            "flops_before": before["flops"],
            "importance": importance,
            "scope": cfg.scope,
            "allocation": cfg.allocation,
            "recovery": recovery,
        }
        if data is not None:
            metrics["mAP_before"] = _map(model, data[1], cfg)
        teacher = copy.deepcopy(original).eval() if recovery == "distill" else None
        rec_time = {"seconds": 0.0, "cpu_seconds": 0.0, "iterations": 0}

        def recover(m: nn.Module, step: int) -> nn.Module:
            assert data is not None
            if step == cfg.steps - 1 and "mAP_pruned" not in metrics:  # candidates measured it
                metrics["mAP_pruned"] = _map(m, data[1], cfg)
            res = _recover(m, teacher, data[0], cfg, ctx, step, recovery)
            for k in rec_time:
                rec_time[k] += getattr(res, k)
            sync_size_attrs(res.model)
            return res.model

        if cfg.flops is None and cfg.allocation == "uniform":
            # a channel ratio: torch-pruning's own iterative schedule over ``steps``
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
                if recovery != "none":
                    model = recover(model, step)
        else:
            sizes = conv_shapes(model, example)
            model = self._to_flops(model, example, sizes, importance, data, metrics, ctx, recover)
            metrics["flops_removed_estimate"] = round(
                1 - conv_flops(model, sizes) / max(conv_flops(original, sizes), 1), 4
            )
        model.eval()
        ignored = default_ignored(model, cfg.ignore)
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
                "params_removed": _frac(before["params"], summary["params"]),
                "flops_removed": _frac(before["flops"], summary["flops"]),
            }
        )
        if cfg.flops is not None and metrics["flops_removed"] is not None:
            miss = abs(metrics["flops_removed"] - cfg.flops)
            if miss > cfg.flops_tolerance:
                raise DamoError(
                    f"prune: removed {metrics['flops_removed']:.1%} of the FLOPs, asked "
                    f"{cfg.flops:.0%} (tolerance {cfg.flops_tolerance:.0%})",
                    "channel counts are integers: raise flops_tolerance, or drop round_to",
                )
        if recovery != "none":
            assert data is not None
            metrics["mAP_recovered"] = _map(model, data[1], cfg)
            metrics["mAP_finetuned"] = metrics["mAP_recovered"]  # the name earlier reports read
            metrics["recovery_seconds"] = round(rec_time["seconds"], 1)
            metrics["recovery_cpu_seconds"] = round(rec_time["cpu_seconds"], 1)
            metrics["recovery_iterations"] = rec_time["iterations"]
        elif data is not None and "mAP_pruned" not in metrics:
            metrics["mAP_pruned"] = _map(model, data[1], cfg)
        ctx.extra.update(metrics)
        out.meta["prune"] = metrics
        return out

    def _to_flops(
        self,
        model: nn.Module,
        example: Any,
        sizes: dict[str, tuple[int, int]],
        importance: str,
        data: tuple[Any, Any] | None,
        metrics: dict[str, Any],
        ctx: PassContext,
        recover: Any,
    ) -> nn.Module:
        """Prune in ``steps`` to a FLOPs goal: each step searches the ratio (uniform or
        global) or the scale of the per-block ratios (sensitivity) that brings the model to
        ``1 - flops * (step + 1) / steps`` of its FLOPs, measured on the pruned copy."""
        from damo_plugins.train import sensitivity as sens_mod
        from damo_plugins.train.prune import (
            MAX_LAYER_RATIO,
            accumulate_gradients,
            conv_flops,
            prune_copy,
            search_flops,
        )

        cfg: PruneConfig = self.config  # type: ignore[assignment]
        f0 = conv_flops(model, sizes)
        common = {"round_to": cfg.round_to}
        if cfg.flops is not None:
            target = cfg.flops
        else:  # the FLOPs the uniform ratio would remove: same budget, reallocated
            trial = prune_copy(model, example, cfg.ignore, "l1", ratio=cfg.ratio, **common)
            target = 1 - conv_flops(trial, sizes) / f0
        metrics["flops_target"] = round(target, 4)

        def taylor(m: nn.Module, stream: int = 0) -> None:
            if importance == "taylor":
                assert data is not None
                _reseed(data[0], ctx.seed, stream)
                accumulate_gradients(m, data[0], cfg.taylor_images, cfg.batch_size)

        weights: dict[str, float] | None = None
        if cfg.allocation == "sensitivity":
            assert data is not None
            taylor(model)
            sens = _sensitivity(model, example, importance, data, cfg, ctx)
            weights = sens_mod.weights(sens, cfg.sensitivity_strength)
            metrics["sensitivity"] = {
                "cached": sens.cached,
                "evaluations": sens.evaluations,
                "seconds": sens.seconds,
                "cache": sens.path,
                "mAP_control": sens.base_map,
                "drop": {b: v["drop"] for b, v in sens.blocks.items()},
            }
        steps = []
        for step in range(cfg.steps):
            goal = round(f0 * (1 - target * (step + 1) / cfg.steps))
            tolerance = cfg.flops_tolerance * f0  # what the run accepts; the search aims at half
            hi = MAX_LAYER_RATIO
            if weights is not None:  # the knob scales the per-block ratios
                hi = MAX_LAYER_RATIO / max(min(weights.values()), 1e-3)

            def trial(
                k: float, base: nn.Module = model, w: dict[str, float] | None = weights
            ) -> tuple[nn.Module, int]:
                m = prune_copy(
                    base,
                    example,
                    cfg.ignore,
                    importance,
                    ratio=k,
                    per_block=None if w is None else sens_mod.allocate(w, k, MAX_LAYER_RATIO),
                    global_pruning=cfg.scope == "global",
                    **common,
                )
                return m, conv_flops(m, sizes)

            # each candidate ranks channels on its own augmentation of the Taylor images;
            # one candidate needs no comparison (and no control evaluation). Only the best
            # copy so far is kept: N candidates cost N prunings, not N models in memory.
            scores: list[float] = []
            best: tuple[tuple[bool, float], int, float, nn.Module, int] | None = None
            for c in range(cfg.candidates):
                taylor(model, c)
                knob, pruned, flops = search_flops(
                    trial, conv_flops(model, sizes), goal, hi, round(tolerance / 2)
                )
                model.zero_grad(set_to_none=True)
                score = 0.0
                if cfg.candidates > 1:
                    assert data is not None
                    score = _map(pruned, data[1], cfg)
                    ctx.log(
                        f"  prune step {step + 1} candidate {c + 1}/{cfg.candidates}: "
                        f"{1 - flops / f0:.1%} of FLOPs removed, control mAP {score}"
                    )
                scores.append(score)
                rank = (abs(flops - goal) <= tolerance, score)
                if best is None or rank > best[0]:
                    best = (rank, c, knob, pruned, flops)
                del pruned
            assert best is not None
            _, chosen, knob, model, flops = best
            entry: dict[str, Any] = {"step": step + 1, "flops_removed": round(1 - flops / f0, 4)}
            if cfg.candidates > 1:
                entry["candidates"] = scores
                entry["chosen"] = chosen + 1
                if step == cfg.steps - 1:  # the chosen copy's control mAP: not measured twice
                    metrics["mAP_pruned"] = scores[chosen]
            if weights is not None:
                entry["ratios"] = {
                    b: round(r, 3)
                    for b, r in sens_mod.allocate(weights, knob, MAX_LAYER_RATIO).items()
                }
            else:
                entry["ratio"] = round(knob, 4)
            steps.append(entry)
            ctx.log(f"  prune step {step + 1}: {entry['flops_removed']:.1%} of FLOPs removed")
            miss = abs(entry["flops_removed"] - target)
            if step == cfg.steps - 1 and miss > cfg.flops_tolerance:
                # said before recovery spends minutes on a model that will be refused
                raise DamoError(
                    f"prune: removed {entry['flops_removed']:.1%} of the FLOPs, asked "
                    f"{target:.0%} (tolerance {cfg.flops_tolerance:.0%})",
                    "channel counts are integers and no layer loses more than 90 %: raise "
                    "flops_tolerance, lower flops, or drop round_to",
                )
            if metrics["recovery"] != "none":
                model = recover(model, step)
        metrics["steps"] = steps
        return model

    def verify(self, before: ModelArtifact, after: ModelArtifact, ctx: PassContext) -> Verification:
        """Pruning changes the numbers on purpose: check the pruned model runs, keeps its
        output shapes, and lost prunable channels (FLOPs within tolerance is checked by run)."""
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
        asked = f"flops {cfg.flops:.0%}" if cfg.flops is not None else f"ratio {cfg.ratio:.0%}"
        flops_removed = meta.get("flops_removed")
        msg = (
            f"removed {removed:.1%} of prunable channels"
            + (f", {flops_removed:.1%} of FLOPs" if flops_removed is not None else "")
            + f" (asked {asked}); params {meta.get('params_before')} -> "
            f"{meta.get('params_after')}; outputs "
            f"{'keep their shapes' if shapes_ok else 'CHANGED SHAPE'}{'' if finite else ', NOT FINITE'}"
        )
        if "mAP_recovered" in meta:
            msg += (
                f"; mAP {meta.get('mAP_before')} -> {meta.get('mAP_pruned')} pruned -> "
                f"{meta['mAP_recovered']} after {meta['recovery']} "
                f"({meta.get('recovery_cpu_seconds')} CPU s)"
            )
        return Verification(ok, {k: v for k, v in meta.items()}, msg)

    @classmethod
    def replay(cls, module: Any, record: dict[str, Any]) -> Any:
        from damo_plugins.train.prune import apply_shapes, sync_size_attrs

        model = apply_shapes(module, record.get("changes") or {})
        sync_size_attrs(model)
        return model


def _frac(before: int | None, after: int | None) -> float | None:
    if not before or after is None:
        return None
    return round(1 - after / before, 4)


def _reseed(train_set: Any, seed: int, stream: int = 0) -> None:
    """Fix the augmentation stream of the images Taylor ranks by, so the same model and data
    rank channels the same way (and the sensitivity cache key is reproducible); ``stream``
    ``k > 0`` is candidate ``k``'s own stream (stream 0 is the one a single ranking uses)."""
    import numpy as np

    if hasattr(train_set, "rng"):
        key = [seed, 104_729] if stream == 0 else [seed, 104_729, stream]
        train_set.rng = np.random.default_rng(key)


def _data(cfg: PruneConfig, shape: list[int], ctx: PassContext) -> tuple[Any, Any] | None:
    if cfg.data is None:
        return None
    from damo_plugins.train.trainer import data_splits

    size = cfg.img_size or int(shape[-1])
    return data_splits(Path(cfg.data), size, seed=ctx.seed)


def _map(model: nn.Module, val_set: Any, cfg: PruneConfig, limit: int | None = None) -> float:
    from damo_plugins.data.evaluate import evaluate

    return round(evaluate(model, val_set, limit=limit or cfg.eval_limit)["mAP"], 4)


def _sensitivity(
    model: nn.Module,
    example: Any,
    importance: str,
    data: tuple[Any, Any],
    cfg: PruneConfig,
    ctx: PassContext,
) -> Any:
    """Per-block mAP cost on the first ``sensitivity_images`` control images, cached."""
    from damo_plugins.train import sensitivity as sens_mod
    from damo_plugins.train.prune import default_ignored, group_blocks, prune_copy

    train_set, val_set = data
    n = min(cfg.sensitivity_images, len(val_set))
    blocks = sorted(group_blocks(model, example, default_ignored(model, cfg.ignore)))
    samples = [val_set[i] for i in range(n)]
    if importance == "taylor":
        _reseed(train_set, ctx.seed)
        samples += [train_set[i] for i in range(min(cfg.taylor_images, len(train_set)))]
        _reseed(train_set, ctx.seed)
    settings = {
        "probe_ratio": cfg.sensitivity_ratio,
        "importance": importance,
        "control_images": n,
        "taylor_images": cfg.taylor_images if importance == "taylor" else None,
        "img_size": int(getattr(val_set, "img_size", 0)),
        "input": list(example.shape),
        "ignore": sorted(cfg.ignore),
        "round_to": cfg.round_to,
        "blocks": blocks,
    }
    key = sens_mod.content_key(model, samples, settings)

    def prune_block(b: str) -> nn.Module:
        return prune_copy(
            model,
            example,
            cfg.ignore,
            importance,
            per_block={b: cfg.sensitivity_ratio},
            round_to=cfg.round_to,
        )

    return sens_mod.analyse(
        model,
        blocks,
        prune_block,
        lambda m: _map(m, val_set, cfg, limit=n),
        key,
        settings,
        cfg.cache_dir,
        log=ctx.log,
    )


def _recover(
    model: nn.Module,
    teacher: nn.Module | None,
    train_set: Any,
    cfg: PruneConfig,
    ctx: PassContext,
    step: int,
    mode: str,
) -> Any:
    from damo_plugins.train.recovery import RecoverySettings, recover

    settings = RecoverySettings(
        mode=mode,
        epochs=cfg.finetune_epochs,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        warmup_iters=cfg.warmup_iters,
        ema=cfg.ema,
        feature_weight=cfg.feature_weight,
        cls_weight=cfg.cls_weight,
        box_weight=cfg.box_weight,
        tau=cfg.distill_tau,
        seed=ctx.seed + step,
        max_iters=cfg.recovery_iters,
    )
    return recover(
        model, teacher, train_set, settings, log=lambda s: ctx.log(f"  prune {mode}: {s}")
    )


@hookimpl
def damo_passes() -> list[type[Pass]]:
    return [PrunePass]
