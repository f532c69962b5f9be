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
    return pruner_for(
        model,
        example,
        ignored,
        importance or resolve_importance(cfg, model),
        ratio=cfg.ratio,
        global_pruning=cfg.scope == "global",
        steps=cfg.steps,
        round_to=cfg.round_to,
    )


def pruner_for(
    model: nn.Module,
    example: torch.Tensor,
    ignored: set[nn.Module],
    importance: str,
    *,
    ratio: float,
    per_block: dict[str, float] | None = None,
    global_pruning: bool = False,
    steps: int = 1,
    round_to: int | None = None,
) -> Any:
    """A torch-pruning ``MetaPruner``; ``per_block`` gives each layer block its own ratio.

    With ``per_block``, every prunable conv gets the ratio of its block (:func:`block_of`)
    and ``ratio`` is unused: torch-pruning takes a channel group's ratio from the first of
    its out-channel members found in the dict, which is the group's root conv — the same conv
    :func:`group_blocks` files the group under, so a block's ratio is exactly what its groups
    lose. Per-block ratios rank locally (the global ranking would ignore them).
    """
    try:
        import torch_pruning as tp
    except ImportError as exc:  # pragma: no cover - a declared dependency of this pass
        raise DamoError("the prune pass needs torch-pruning", "pip install torch-pruning") from exc
    kwargs: dict[str, Any] = {}
    if round_to:
        kwargs["round_to"] = round_to
    if per_block is not None:
        kwargs["pruning_ratio_dict"] = {
            conv: float(per_block.get(block_of(name), 0.0))
            for name, conv in model.named_modules()
            if isinstance(conv, nn.Conv2d) and conv not in ignored
        }
        ratio, global_pruning = 0.0, False
    with warnings.catch_warnings():
        # scalar parameters (the head's Scale) are not prunable; torch-pruning warns about them
        warnings.simplefilter("ignore")
        return tp.pruner.MetaPruner(
            model,
            example,
            importance=_importance(importance),
            pruning_ratio=ratio,
            global_pruning=global_pruning,
            max_pruning_ratio=MAX_LAYER_RATIO,
            iterative_steps=steps,
            ignored_layers=sorted(ignored, key=id),
            **kwargs,
        )


#: no layer loses more than this fraction of its channels (so none disappears)
MAX_LAYER_RATIO = 0.9


def block_of(name: str) -> str:
    """The layer block a module belongs to: a backbone stage (``backbone.block_list.3``) or a
    neck fusion block (``neck.merge_5``, ``neck.bu_conv24``) — the first two parts of its
    name, three when the second is a list (``block_list.N``).

    Why blocks and not channel groups: a tiny DAMO-YOLO has ~50 coupled groups and a
    DAMO-YOLO-S ~150; measuring each alone costs one evaluation per group. Backbone stages and
    neck blocks (16 for DAMO-YOLO-T) are the units whose sensitivity differs most (the first
    stage and the stride-8 neck path carry small objects) and they cost 16 evaluations.
    """
    parts = name.split(".")
    depth = 3 if len(parts) > 2 and parts[2].isdigit() else 2
    return ".".join(parts[:depth])


def group_blocks(
    model: nn.Module, example: torch.Tensor, ignored: set[nn.Module]
) -> dict[str, int]:
    """Block name -> number of prunable channel groups rooted in it (dependency graph order)."""
    pruner = pruner_for(model, example, ignored, "l1", ratio=0.0)
    names = {m: n for n, m in model.named_modules()}
    blocks: dict[str, int] = {}
    for g in pruner.DG.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    ):
        b = block_of(names[g[0][0].target.module])
        blocks[b] = blocks.get(b, 0) + 1
    return blocks


def conv_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, int]]:
    """Output height and width of every conv of ``model`` on ``example`` (one forward pass).

    Channel pruning never changes a feature map's spatial size, so these sizes, recorded once,
    turn any pruned copy's weight shapes into its FLOPs (:func:`conv_flops`) without running it.
    """
    sizes: dict[str, tuple[int, int]] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):

            def hook(mod: nn.Module, inp: Any, out: torch.Tensor, name: str = name) -> None:
                sizes[name] = (
                    (int(out.shape[-2]), int(out.shape[-1]))
                    if out.dim() == 4
                    else (int(out[..., 0].numel() // out.shape[0]), 1)
                )

            handles.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return sizes


def conv_flops(model: nn.Module, sizes: dict[str, tuple[int, int]]) -> int:
    """FLOPs (2 x multiply-accumulates, batch 1) of the convs and linears of ``model``.

    What ``torch.utils.flop_counter`` counts for a conv-only network (it counts convolutions
    and matrix products, not adds or activations), from weight shapes alone — so the FLOPs
    target search can try a pruning in ~0.5 s instead of tracing a forward pass. A detector's
    decode adds one matrix product no pruning changes (the bins' expectation, 2 x 4 x bins per
    anchor); a test checks that the counter exceeds this count by exactly that, pruned or not.
    """
    total = 0
    for name, m in model.named_modules():
        if name not in sizes:
            continue
        h, w = sizes[name]
        if isinstance(m, nn.Conv2d):
            total += 2 * h * w * m.weight.shape[0] * m.weight[0].numel()
        elif isinstance(m, nn.Linear):
            total += 2 * h * m.weight.numel()
    return total


def clone_with_grads(model: nn.Module) -> nn.Module:
    """A deep copy that keeps the ``.grad`` of every parameter (deepcopy drops them), so a
    trial pruning of the copy ranks channels by the same Taylor scores as the model."""
    import copy

    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters()):
        if p.grad is not None:
            q.grad = p.grad.detach().clone()
    return twin


def prune_copy(
    model: nn.Module,
    example: torch.Tensor,
    ignore: list[str],
    importance: str,
    *,
    ratio: float = 0.0,
    per_block: dict[str, float] | None = None,
    global_pruning: bool = False,
    round_to: int | None = None,
) -> nn.Module:
    """A pruned copy of ``model`` (the model is untouched); ``ignore`` as in the config."""
    twin = clone_with_grads(model) if importance == "taylor" else _plain_copy(model)
    ignored = default_ignored(twin, ignore)
    pruner = pruner_for(
        twin,
        example,
        ignored,
        importance,
        ratio=ratio,
        per_block=per_block,
        global_pruning=global_pruning,
        round_to=round_to,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.step()
    twin.zero_grad(set_to_none=True)
    sync_size_attrs(twin)
    return twin


def _plain_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def search_flops(
    trial: Any,
    start: int,
    goal: int,
    hi: float,
    tolerance: int,
    iterations: int = 12,
) -> tuple[float, nn.Module, int]:
    """Find the knob ``x`` in ``(0, hi]`` whose ``trial(x)`` (a pruned copy and its FLOPs)
    lands at ``goal`` FLOPs within ``tolerance``; ``start`` is the FLOPs at ``x = 0``.

    Removing a fraction ``x`` of every layer's channels scales a conv's FLOPs by about
    ``(1 - x)^2`` (inputs and outputs both shrink), so ``sqrt(FLOPs)`` is close to linear in
    ``x``: a regula-falsi search on it (bracketed, so it cannot diverge) usually lands in 2-4
    trials where a bisection needs ~8 — each trial traces and prunes a copy. Returns the knob,
    the copy and the FLOPs closest to the goal; the caller judges whether that is close enough
    (channel counts are integers: a tiny layer cannot lose 0.3 of a channel).
    """
    import math

    target = math.sqrt(goal)
    lo, s_lo = 0.0, math.sqrt(start)
    up, s_up = hi, None  # the upper end is tried only if needed
    best: tuple[float, nn.Module, int] | None = None
    x = min(hi, 1 - target / s_lo) if s_lo > 0 else hi
    for _ in range(iterations):
        x = min(max(x, lo + 1e-4), up)
        model, flops = trial(x)
        if best is None or abs(flops - goal) < abs(best[2] - goal):
            best = (x, model, flops)
        if abs(flops - goal) <= tolerance:
            break
        s = math.sqrt(flops)
        if flops > goal:
            lo, s_lo = x, s
        else:
            up, s_up = x, s
        if s_up is None:  # nothing below the goal yet: extrapolate from x = 0 through lo
            if lo >= up:  # even ``hi`` leaves too many FLOPs: the goal is out of reach
                break
            slope = (s_lo - math.sqrt(start)) / lo
            x = lo + (target - s_lo) / slope if slope < 0 else up
        else:
            x = lo + (s_lo - target) * (up - lo) / max(s_lo - s_up, 1e-9)
            if not (lo < x < up) or up - lo < 1e-4:
                x = (lo + up) / 2
    assert best is not None
    return best
