"""Structured channel pruning on torch-pruning's dependency graph: the algorithm.

The ``prune`` step (:mod:`damo_plugins.plugins.prune`) drives it; see there for the method.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from damo_plugins.core.errors import DamoError

SIZE_ATTRS = (
    "in_channels",
    "out_channels",
    "num_features",
    "in_features",
    "out_features",
    "groups",
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


def resolve_importance(cfg: Any, model: nn.Module) -> str:
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
    cfg: Any,
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


