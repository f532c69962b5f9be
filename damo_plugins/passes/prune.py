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
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from damo_plugins.artifact import ModelArtifact
from damo_plugins.errors import DamoError
from damo_plugins.hookspecs import hookimpl
from damo_plugins.passes.base import Pass, PassConfig, PassContext
from damo_plugins.verify import Verification

SIZE_ATTRS = (
    "in_channels",
    "out_channels",
    "num_features",
    "in_features",
    "out_features",
    "groups",
)


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


def prunable_convs(model: nn.Module, ignored: set[nn.Module]) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and m not in ignored]


def default_ignored(model: nn.Module, names: list[str]) -> set[nn.Module]:
    """The detector's output convs, plus user-named modules (their *outputs* are kept)."""
    mods = dict(model.named_modules())
    ignored: set[nn.Module] = set()
    head = getattr(model, "head", None)
    for attr in ("gfl_cls", "gfl_reg"):
        ignored.update(getattr(head, attr, None) or [])
    for n in names:
        if n not in mods:
            raise DamoError(
                f"prune: no module named {n!r} to ignore", "use names from model.named_modules()"
            )
        ignored.update(m for m in mods[n].modules())
    if not ignored and not isinstance(model, nn.Conv2d):
        # A generic model: keep the last conv/linear layer (its outputs are the model's).
        last = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        if last:
            ignored.add(last[-1])
    return ignored


def sync_size_attrs(model: nn.Module) -> None:
    """Containers caching channel counts (our RepConv: ``in_channels``/``out_channels`` used
    when fusing) are updated from the convs they wrap after pruning."""
    for m in model.modules():
        dense = getattr(m, "rbr_dense", None)
        conv = getattr(dense, "conv", None)
        if isinstance(conv, nn.Conv2d) and not isinstance(m, nn.Conv2d):
            m.in_channels, m.out_channels = conv.in_channels, conv.out_channels


def shape_record(before: nn.Module, after: nn.Module) -> dict[str, Any]:
    """Per changed module: new tensor shapes and size attributes (JSON-able)."""
    old = dict(before.named_modules())
    changes: dict[str, Any] = {}
    for name, mod in after.named_modules():
        ref = old.get(name)
        if ref is None:
            continue
        tensors = {}
        for tname, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
            rt = getattr(ref, tname, None)
            if t is not None and isinstance(rt, torch.Tensor) and tuple(rt.shape) != tuple(t.shape):
                tensors[tname] = list(t.shape)
        attrs = {
            a: int(getattr(mod, a))
            for a in SIZE_ATTRS
            if isinstance(getattr(mod, a, None), int) and getattr(mod, a) != getattr(ref, a, None)
        }
        if tensors or attrs:
            changes[name] = {"tensors": tensors, "attrs": attrs}
    return changes


def apply_shapes(model: nn.Module, changes: dict[str, Any]) -> nn.Module:
    """Resize parameters/buffers and size attributes as recorded (values are placeholders)."""
    mods = dict(model.named_modules())
    for name, change in changes.items():
        mod = mods.get(name)
        if mod is None:
            raise DamoError(
                f"cannot rebuild the pruned model: it has no module {name!r}",
                "the checkpoint was made from another architecture",
            )
        for a, v in (change.get("attrs") or {}).items():
            setattr(mod, a, int(v))
        for tname, shape in (change.get("tensors") or {}).items():
            cur = getattr(mod, tname)
            new = torch.zeros([int(s) for s in shape], dtype=cur.dtype)
            if isinstance(cur, nn.Parameter):
                setattr(mod, tname, nn.Parameter(new, requires_grad=cur.requires_grad))
            else:
                mod._buffers[tname] = new
    return model


def channel_count(model: nn.Module, ignored: set[nn.Module]) -> int:
    return sum(c.out_channels for c in prunable_convs(model, ignored))


def _importance(kind: str) -> Any:
    import torch_pruning as tp

    if kind == "bn":
        return tp.importance.BNScaleImportance()
    if kind == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.GroupMagnitudeImportance(p=1 if kind == "l1" else 2)


def _has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _bn_scales_vary(model: nn.Module) -> bool:
    """False for an untrained model: every BN scale is still 1 and ranks nothing (and ties
    make a global ranking remove no channel at all)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            w = m.weight.detach()
            if w.numel() > 1 and bool((w != w[0]).any()):
                return True
    return False


def _is_detector(model: nn.Module) -> bool:
    return hasattr(model, "features") and hasattr(getattr(model, "head", None), "forward_levels")


def resolve_importance(cfg: PruneConfig, model: nn.Module) -> str:
    """The importance actually used (``auto`` resolved); a clear error when one cannot apply."""
    kind = cfg.importance
    if kind == "auto":
        if cfg.data is not None and _is_detector(model):
            return "taylor"
        return "bn" if _has_bn(model) and _bn_scales_vary(model) else "l1"
    if kind == "bn" and not _has_bn(model):
        raise DamoError(
            "prune: importance 'bn' needs BatchNorm layers and this model has none "
            "(already fused?)",
            "use importance: l1 or l2, or prune before reparam",
        )
    if kind == "taylor":
        if cfg.data is None:
            raise DamoError(
                "prune: importance 'taylor' needs training data (it ranks channels by loss "
                "gradients)",
                "give data: <folder>, or use importance: bn / l1",
            )
        if not _is_detector(model):
            raise DamoError(
                f"prune: importance 'taylor' needs a DAMO-YOLO detector (its loss), not a "
                f"{type(model).__name__}",
                "use importance: bn, l1 or l2",
            )
    return kind


def accumulate_gradients(model: nn.Module, train_set: Any, images: int, batch_size: int) -> None:
    """Detection-loss gradients of ``images`` training images, summed into ``.grad``.

    The model stays in eval mode (BN uses its running statistics), so ranking channels does
    not change the model; the images are the first ones of the (seeded) training set.
    """
    from damo_plugins.data.coco import collate
    from damo_plugins.train.loop import raw_outputs
    from damo_plugins.train.losses import DetectionLoss

    model.eval()
    model.zero_grad(set_to_none=True)
    loss_fn = DetectionLoss(model.head.num_classes, model.head.reg_max)
    n = min(images, len(train_set))
    for start in range(0, n, batch_size):
        batch, targets, _ = collate(
            [train_set[i] for i in range(start, min(n, start + batch_size))]
        )
        _, raw = raw_outputs(model, batch)
        loss, _ = loss_fn(raw, targets)
        loss.backward()


def build_pruner(
    model: nn.Module,
    example: torch.Tensor,
    cfg: PruneConfig,
    ignored: set[nn.Module],
    importance: str | None = None,
) -> Any:
    try:
        import torch_pruning as tp
    except ImportError as exc:  # pragma: no cover - a declared dependency of this pass
        raise DamoError("the prune pass needs torch-pruning", "pip install torch-pruning") from exc
    kwargs: dict[str, Any] = {}
    if cfg.round_to:
        kwargs["round_to"] = cfg.round_to
    with warnings.catch_warnings():
        # scalar parameters (the head's Scale) are not prunable; torch-pruning warns about them
        warnings.simplefilter("ignore")
        return tp.pruner.MetaPruner(
            model,
            example,
            importance=_importance(importance or resolve_importance(cfg, model)),
            pruning_ratio=cfg.ratio,
            global_pruning=cfg.scope == "global",
            max_pruning_ratio=0.9,
            iterative_steps=cfg.steps,
            ignored_layers=sorted(ignored, key=id),
            **kwargs,
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
    from damo_plugins.training import data_splits

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
