"""``reparam``: turn every train-time multi-branch block into one convolution, exactly.

Two levels, combined by the default ``mode: auto``:

* **Module level** — every module that knows how to deploy itself (a ``switch_to_deploy``
  method: our RepConv, DAMO-YOLO's, RepVGG's, YOLOv6/7's ...) is asked to; Conv→BN pairs
  inside an ``nn.Sequential`` (where order is execution order) are folded. With
  ``space_to_depth`` (the default), a Focus stem (a ``fold_space_to_depth`` method: ours)
  becomes one stride-2 convolution on the image (see :class:`~damo_plugins.models.blocks.Focus`).
* **Graph level** — for code that does not cooperate, the model is traced with ``torch.fx``
  and the graph is searched for (1) *sums of parallel branches* reading the same tensor —
  k×k conv(+BN), 1x1 conv(+BN), BN alone (an identity branch), numeric constants — which are
  replaced by one conv, (2) with ``space_to_depth``, Focus stems written as code (four
  ``x[..., dy::2, dx::2]`` phases concatenated on the channels, then a conv: upstream's and
  YOLOX's ``Focus``), which become one stride-2 conv, and (3) every remaining Conv→BN pair,
  which is folded (grouped, depthwise, strided, dilated, with or without conv bias). When
  only BNs are folded the model keeps its own classes (the BN modules become ``Identity``);
  when branches are merged or a stem is folded the traced part becomes a
  ``torch.fx.GraphModule``.

A module fx cannot trace (data-dependent control flow, list unpacking of inputs, ...) is not
an error: its children are tried one by one, and what stays untraced falls back to the
module level; the report names those modules. ``mode: module`` or ``mode: graph`` selects
one level only (graph mode on a cooperative model proves the graph path on real code).

The pass returns a new model (the input is deep-copied) and records ``{"mode", "fold_bn"}``
in the artifact's ``arch`` so a saved checkpoint rebuilds: the architecture is rebuilt, the
same (deterministic, weight-independent) rewrite is replayed, then the weights load.
"""

from __future__ import annotations

import copy
import itertools
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from damo_plugins.core.errors import DamoError, first_line
from damo_plugins.lib.fusion import fold_bn, identity_kernel, pad_kernel, space_to_depth_conv

BN_TYPES = (nn.BatchNorm2d,)
#: attributes copied onto a GraphModule that replaces a module (what callers look for)
KEEP_ATTRS = ("input_names", "output_names", "default_input_shape")


@dataclass
class FusionReport:
    """What a fusion did; ``as_dict`` goes into the step's report."""

    mode: str
    repconv_deployed: int = 0
    space_to_depth_folded: int = 0
    branch_sums_fused: int = 0
    branches_merged: int = 0
    conv_bn_folded: int = 0
    bn_before: int = 0
    bn_after: int = 0
    multi_branch_left: int = 0
    graph_modules: list[str] = field(default_factory=list)
    untraced: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "repconv_deployed": self.repconv_deployed,
            "space_to_depth_folded": self.space_to_depth_folded,
            "branch_sums_fused": self.branch_sums_fused,
            "branches_merged": self.branches_merged,
            "conv_bn_folded": self.conv_bn_folded,
            "bn_removed": self.bn_before - self.bn_after,
            "bn_remaining": self.bn_after,
            "multi_branch_remaining": self.multi_branch_left,
            "graph_modules": self.graph_modules,
            "untraced": self.untraced,
            "notes": self.notes,
        }


# ============================================================================ entry
def reparameterize(
    model: nn.Module,
    mode: str = "auto",
    fold: bool = True,
    inplace: bool = False,
    space_to_depth: bool = True,
) -> tuple[nn.Module, FusionReport]:
    """Return a fused copy of ``model`` (eval mode) and what was done.

    ``inplace=True`` fuses ``model`` itself (its submodules are replaced), for callers that
    own a freshly built module, such as :meth:`ReparamPass.replay`. ``space_to_depth``
    folds Focus stems (at both levels).
    """
    if mode not in ("auto", "module", "graph"):
        raise DamoError(f"unknown reparam mode {mode!r}", "auto, module or graph")
    work = (model if inplace else copy.deepcopy(model)).eval()
    rep = FusionReport(mode=mode, bn_before=_count_bn(work))
    if mode in ("auto", "module"):
        rep.repconv_deployed += _deploy_modules(work)
        if space_to_depth:
            rep.space_to_depth_folded += _fold_space_to_depth(work)
    if mode == "module":
        if fold:
            rep.conv_bn_folded += _fold_sequentials(work)
    else:
        work = _graph_fuse(work, "", rep, fold, space_to_depth)
    rep.bn_after = _count_bn(work)
    rep.multi_branch_left = sum(1 for m in work.modules() if _undeployed(m))
    if rep.bn_after:
        if not fold:
            why = "fold_bn is off"
        elif mode == "module":
            why = "module mode folds Conv+BN only inside nn.Sequential; use mode auto or graph"
        else:
            why = "not directly after a conv" + (
                ", or inside untraced modules" if rep.untraced else ""
            )
        rep.notes.append(f"{rep.bn_after} BatchNorm(s) left: {why}")
    return work.eval(), rep


def _count_bn(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, BN_TYPES))


def _undeployed(m: nn.Module) -> bool:
    return callable(getattr(m, "switch_to_deploy", None)) and any(
        isinstance(c, BN_TYPES) for c in m.modules()
    )


# ===================================================================== module level
def _deploy_modules(model: nn.Module) -> int:
    """Call ``switch_to_deploy`` on every module that still has BatchNorm branches."""
    n = 0
    for m in list(model.modules()):
        if _undeployed(m):
            m.switch_to_deploy()
            n += 1
    return n


def _fold_space_to_depth(model: nn.Module) -> int:
    """Ask every module with a ``fold_space_to_depth`` method (a Focus stem) to fold."""
    return sum(
        1
        for m in list(model.modules())
        if callable(getattr(m, "fold_space_to_depth", None)) and m.fold_space_to_depth()
    )


def _fold_sequentials(model: nn.Module) -> int:
    """Fold Conv2d→BatchNorm2d neighbours inside ``nn.Sequential`` containers."""
    n = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in itertools.pairwise(names):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, BN_TYPES) and _bn_foldable(conv, bn):
                _fold_into(conv, bn)
                seq._modules[b] = nn.Identity()
                n += 1
    return n


def _bn_foldable(conv: nn.Conv2d, bn: nn.Module) -> bool:
    return (
        bn.running_mean is not None
        and bn.num_features == conv.out_channels
        and conv.weight.dtype == bn.running_mean.dtype
    )


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, bn: nn.Module) -> None:
    w, b = fold_bn(conv.weight, conv.bias, bn)
    conv.weight.copy_(w)
    if conv.bias is None:
        conv.bias = nn.Parameter(b)
    else:
        conv.bias.copy_(b)


# ====================================================================== graph level
def _trace(module: nn.Module) -> torch.fx.GraphModule:
    """``symbolic_trace``, undoing what a forward wrote onto its modules while being traced.

    Tracing runs the forward on proxies; code that caches on ``self`` (DAMO-YOLO's head keeps
    its anchor grid and the last feature shape) would otherwise keep proxies in the model.
    Public attributes are restored as they were, including the items of lists and dicts.
    """
    saved = []
    keys = {m: set(vars(m)) for m in module.modules()}
    for m in module.modules():
        for key, value in vars(m).items():
            if not key.startswith("_"):
                items = list(value) if isinstance(value, list) else None
                items = dict(value) if isinstance(value, dict) else items
                saved.append((m, key, value, items))
    try:
        return torch.fx.symbolic_trace(module)
    finally:
        for m, key, value, items in saved:
            setattr(m, key, value)  # plain attribute: nn.Module only routes params/modules
            if isinstance(items, list):
                value[:] = items
            elif isinstance(items, dict):
                value.clear()
                value.update(items)
        for m, before in keys.items():
            for key in set(vars(m)) - before:
                delattr(m, key)  # created by the traced forward: holds proxies


def _graph_fuse(
    module: nn.Module, path: str, rep: FusionReport, fold: bool, space_to_depth: bool = True
) -> nn.Module:
    """Fuse ``module`` through fx, or its children if it cannot be traced; return the result."""
    if torch.fx.Tracer().is_leaf_module(module, ""):
        return module  # a single built-in layer (conv, BN, ...): nothing to fuse inside it
    try:
        gm = _trace(module)
    except Exception as exc:
        if rep.mode == "graph" and _undeployed(module):
            module.switch_to_deploy()  # module-level fallback for this block
            rep.repconv_deployed += 1
            rep.notes.append(
                f"{path or '<root>'}: fx could not trace it; deployed it at module level"
            )
            return module
        children = list(module.named_children())
        if not children:
            if _count_bn(module) or _undeployed(module):
                why = first_line(exc)[:120]
                rep.untraced.append(f"{path or '<root>'} ({type(exc).__name__}: {why})")
            return module
        for name, child in children:
            new = _graph_fuse(child, f"{path}.{name}" if path else name, rep, fold, space_to_depth)
            if new is not child:
                setattr(module, name, new)
        if any(isinstance(c, BN_TYPES) for c in module.children()):
            rep.untraced.append(
                f"{path or '<root>'} (fx: {type(exc).__name__}; its own BatchNorms are not folded)"
            )
        return module

    rewriter = _GraphRewriter(gm, rep)
    merged = rewriter.fuse_branch_sums()
    if space_to_depth:
        stems = rewriter.fold_space_to_depth()
        rep.space_to_depth_folded += stems
        merged += stems
    folded_bns = rewriter.fold_conv_bn() if fold else []
    if not merged:
        # Only BN folding: the conv objects are shared with ``module`` and already updated;
        # swap the folded BNs for Identity and keep the user's classes.
        for target in folded_bns:
            parent, _, name = target.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, name, nn.Identity())
        return module
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    # Keep what callers read off the model (input/output names, its config, ...).
    for attr in KEEP_ATTRS:
        if hasattr(module, attr) and not hasattr(gm, attr):
            setattr(gm, attr, getattr(module, attr))
    for key, value in vars(module).items():
        if not key.startswith("_") and key != "training" and not hasattr(gm, key):
            setattr(gm, key, value)
    rep.graph_modules.append(path or "<root>")
    return gm.train(module.training)


_ADD_TARGETS: set[Any] = {operator.add, operator.iadd, torch.add}


def _is_add(node: torch.fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_TARGETS:
        return len(node.args) == 2 and not node.kwargs
    return (
        node.op == "call_method"
        and node.target in ("add", "add_", "__add__")
        and len(node.args) == 2
        and not node.kwargs
    )


@dataclass
class _Branch:
    """One summand: a conv (+ optional BN), or a BN on the input (identity branch)."""

    source: torch.fx.Node  # the tensor the branch reads
    conv: nn.Conv2d | None
    bn: nn.Module | None
    nodes: list[torch.fx.Node]  # nodes to erase when merged
    names: list[str]


class _GraphRewriter:
    def __init__(self, gm: torch.fx.GraphModule, rep: FusionReport) -> None:
        self.gm = gm
        self.rep = rep
        self.uses: dict[str, int] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                self.uses[n.target] = self.uses.get(n.target, 0) + 1

    def _mod(self, node: Any, kind: type | tuple[type, ...]) -> Any:
        if isinstance(node, torch.fx.Node) and node.op == "call_module":
            m = self.gm.get_submodule(node.target)
            if isinstance(m, kind) and self.uses.get(node.target) == 1:
                return m
        return None

    # ---------------------------------------------------------------- branches
    def _leaves(self, node: torch.fx.Node) -> list[Any]:
        out: list[Any] = []
        for a in node.args:
            if isinstance(a, torch.fx.Node) and _is_add(a) and len(a.users) == 1:
                out.extend(self._leaves(a))
            else:
                out.append(a)
        return out

    def _branch(self, leaf: Any) -> _Branch | None:
        if (
            not isinstance(leaf, torch.fx.Node)
            or len(leaf.users) != 1
            or len(leaf.args) != 1
            or leaf.kwargs
        ):
            return None
        conv = self._mod(leaf, nn.Conv2d)
        if conv is not None:
            return _Branch(leaf.args[0], conv, None, [leaf], [leaf.target])
        bn = self._mod(leaf, BN_TYPES)
        if bn is None or bn.running_mean is None:
            return None
        prev = leaf.args[0]
        conv = self._mod(prev, nn.Conv2d)
        if conv is not None and len(prev.users) == 1 and len(prev.args) == 1 and not prev.kwargs:
            return _Branch(prev.args[0], conv, bn, [leaf, prev], [prev.target, leaf.target])
        return _Branch(prev, None, bn, [leaf], [leaf.target])

    def fuse_branch_sums(self) -> int:
        graph = self.gm.graph
        merged = 0
        for node in list(graph.nodes):
            if node.graph is not graph or not _is_add(node):
                continue
            if len(node.users) == 1 and _is_add(next(iter(node.users))):
                continue  # not the root of its sum
            leaves = self._leaves(node)
            branches: dict[torch.fx.Node, list[_Branch]] = {}
            others: list[Any] = []
            constant = 0.0
            for leaf in leaves:
                if isinstance(leaf, (int, float)) and not isinstance(leaf, bool):
                    constant += float(leaf)
                    continue
                br = self._branch(leaf)
                if br is None or not isinstance(br.source, torch.fx.Node):
                    others.append(leaf)
                else:
                    branches.setdefault(br.source, []).append(br)
            groups = [
                g
                for g in branches.values()
                if len(g) >= 2 and any(b.conv for b in g) and _compatible(g)
            ]
            if not groups:
                continue
            for g in branches.values():
                if g not in groups:
                    others.extend(b.nodes[0] for b in g)
            new_nodes = []
            for i, g in enumerate(groups):
                conv = _merge(g, constant if i == 0 else 0.0)
                name = self._new_name(g)
                self.gm.add_submodule(name, conv)
                with graph.inserting_before(node):
                    new_nodes.append(graph.call_module(name, (g[0].source,)))
                self.uses[name] = 1
                self.rep.branch_sums_fused += 1
                self.rep.branches_merged += len(g)
            total: Any = None
            with graph.inserting_before(node):
                for term in new_nodes + others:
                    total = (
                        term if total is None else graph.call_function(operator.add, (total, term))
                    )
            node.replace_all_uses_with(total)
            self._erase_tree(node)
            for g in groups:
                for b in g:
                    for n in b.nodes:
                        if not n.users:
                            graph.erase_node(n)
            merged += 1
        return merged

    def _erase_tree(self, node: torch.fx.Node) -> None:
        if node.users:
            return
        args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        self.gm.graph.erase_node(node)
        for a in args:
            if _is_add(a) and not a.users:
                self._erase_tree(a)

    def _new_name(self, group: list[_Branch]) -> str:
        paths = [n.split(".") for b in group for n in b.names]
        prefix: list[str] = []
        for parts in zip(*paths):
            if len(set(parts)) != 1:
                break
            prefix.append(parts[0])
        # Never name it after one of the branches' own paths (they are removed).
        prefix = prefix[: min(len(p) for p in paths) - 1]
        base = ".".join(prefix)
        for i in range(1000):
            leaf = "rbr_reparam" if i == 0 else f"rbr_reparam{i}"
            name = f"{base}.{leaf}" if base else leaf
            try:
                self.gm.get_submodule(name)
            except AttributeError:
                return name
        raise RuntimeError("no free name for a fused conv")  # pragma: no cover

    # ---------------------------------------------------------- space-to-depth
    def fold_space_to_depth(self) -> int:
        """Fold every ``cat(4 phases of x, dim=1) -> conv`` into one stride-2 conv on ``x``."""
        graph = self.gm.graph
        n = 0
        for node in list(graph.nodes):
            found = self._focus(node)
            if found is None:
                continue
            source, phases, conv_node, parts = found
            folded = space_to_depth_conv(self.gm.get_submodule(conv_node.target), phases)
            if folded is None:
                continue
            parent, _, name = conv_node.target.rpartition(".")
            setattr(self.gm.get_submodule(parent) if parent else self.gm, name, folded)
            conv_node.args = (source,)
            graph.erase_node(node)
            for part in parts:
                graph.erase_node(part)
            n += 1
        return n

    def _focus(self, cat: torch.fx.Node) -> tuple[Any, Any, Any, Any] | None:
        """``(x, phases, conv node, the four slices)`` if ``cat`` concatenates four phases
        of one tensor on the channels and feeds nothing but a conv used once; else ``None``."""
        if cat.op != "call_function" or cat.target is not torch.cat or len(cat.users) != 1:
            return None
        parts = cat.args[0] if cat.args else cat.kwargs.get("tensors")
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        conv_node = next(iter(cat.users))
        if (
            dim not in (1, -3)
            or not isinstance(parts, (list, tuple))
            or len(parts) != 4
            or self._mod(conv_node, nn.Conv2d) is None
            or conv_node.args != (cat,)
            or conv_node.kwargs
        ):
            return None
        source, phases = None, []
        for part in parts:
            if (
                not isinstance(part, torch.fx.Node)
                or part.op != "call_function"
                or part.target is not operator.getitem
                or len(part.users) != 1
            ):
                return None
            src, index = part.args
            phase = _phase(index)
            if phase is None or (source is not None and src is not source):
                return None
            source = src
            phases.append(phase)
        return source, tuple(phases), conv_node, list(parts)

    # -------------------------------------------------------------------- Conv→BN
    def fold_conv_bn(self) -> list[str]:
        graph = self.gm.graph
        folded = []
        for node in list(graph.nodes):
            bn = self._mod(node, BN_TYPES)
            if bn is None or len(node.args) != 1 or node.kwargs:
                continue
            prev = node.args[0]
            conv = self._mod(prev, nn.Conv2d)
            if conv is None or len(prev.users) != 1 or not _bn_foldable(conv, bn):
                continue
            _fold_into(conv, bn)
            node.replace_all_uses_with(prev)
            graph.erase_node(node)
            folded.append(node.target)
            self.rep.conv_bn_folded += 1
        return folded


def _phase(index: Any) -> tuple[int, int] | None:
    """``(dy, dx)`` of an index ``[..., dy::2, dx::2]`` (or ``[:, :, dy::2, dx::2]``)."""
    if not isinstance(index, tuple) or len(index) not in (3, 4):
        return None
    lead, rows, cols = index[:-2], index[-2], index[-1]
    whole = slice(None, None, None)
    if lead not in ((Ellipsis,), (whole, whole)):
        return None
    offsets = []
    for sl in (rows, cols):
        if not isinstance(sl, slice) or sl.step != 2 or sl.stop is not None:
            return None
        start = sl.start or 0
        if start not in (0, 1):
            return None
        offsets.append(start)
    return offsets[0], offsets[1]


def _compatible(group: list[_Branch]) -> bool:
    """Can these branches (same input) be one conv? Same stride/groups/channels, centred."""
    convs = [b.conv for b in group if b.conv is not None]
    ref = convs[0]
    for c in convs:
        if (
            c.stride != ref.stride
            or c.groups != ref.groups
            or c.in_channels != ref.in_channels
            or c.out_channels != ref.out_channels
            or c.padding_mode != "zeros"
            or isinstance(c.padding, str)
            or c.weight.dtype != ref.weight.dtype
        ):
            return False
        for k, p, d in zip(c.kernel_size, c.padding, c.dilation):
            if k % 2 == 0 or p != d * (k - 1) // 2:
                return False
    for dim in range(2):
        dils = {c.dilation[dim] for c in convs if c.kernel_size[dim] > 1}
        if len(dils) > 1:
            return False
    for b in group:
        if b.bn is not None and (
            b.bn.num_features != ref.out_channels or b.bn.running_mean.dtype != ref.weight.dtype
        ):
            return False
        if b.conv is None and (ref.in_channels != ref.out_channels or ref.stride != (1, 1)):
            return False
    return True


@torch.no_grad()
def _merge(group: list[_Branch], constant: float) -> nn.Conv2d:
    convs = [b.conv for b in group if b.conv is not None]
    ref = convs[0]
    size = (max(c.kernel_size[0] for c in convs), max(c.kernel_size[1] for c in convs))
    dil = tuple(next((c.dilation[d] for c in convs if c.kernel_size[d] > 1), 1) for d in range(2))
    weight = torch.zeros(
        ref.out_channels, ref.in_channels // ref.groups, *size, dtype=ref.weight.dtype
    )
    bias = torch.full((ref.out_channels,), constant, dtype=ref.weight.dtype)
    for b in group:
        if b.conv is not None:
            w, bb = b.conv.weight, b.conv.bias
            if b.bn is not None:
                w, bb = fold_bn(w, bb, b.bn)
        else:
            w, bb = fold_bn(
                identity_kernel(ref.in_channels, ref.groups, size, ref.weight.dtype), None, b.bn
            )
        weight += pad_kernel(w.detach(), size)
        if bb is not None:
            bias += bb.detach()
    pad = tuple(dil[d] * (size[d] - 1) // 2 for d in range(2))
    fused = nn.Conv2d(
        ref.in_channels,
        ref.out_channels,
        size,
        ref.stride,
        pad,
        dil,
        ref.groups,
        bias=True,
        dtype=ref.weight.dtype,
        device=ref.weight.device,
    )
    fused.weight.copy_(weight)
    fused.bias.copy_(bias)
    return fused
