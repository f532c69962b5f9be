"""Recognise the DAMO-YOLO architecture of a bare state dict (an official ``.pth``).

The upstream trainer saves ``{'epoch', 'model': <EMA state_dict>, 'optimizer', ...}``: weights
without the architecture. This project's DAMO-YOLO-T/S/M use the same key names, so the
architecture can be read back from the keys and shapes instead of asking the user for
``--arch``:

* layout: ``backbone.csp_stage.*`` is the CSP backbone of M, ``backbone.block_list.*`` the
  residual one of T and S;
* fused (deploy) or training-time: ``rbr_reparam`` vs ``rbr_dense`` in the RepConvs, and the
  RepVGG identity branch (``rbr_identity``);
* number of classes and ``reg_max`` from the head's convolutions (``head.gfl_cls.0`` has one
  output channel per class, ``head.gfl_reg.0`` ``4 * (reg_max + 1)``);
* width from the channels of the backbone's first and last blocks, depth by trying the usual
  multipliers.

Every candidate is *built on the meta device* (no memory, no initialization: ~0.1 s) and kept
only if its state dict has exactly the same keys and shapes, so a match is a guarantee that
``load_state_dict(strict=True)`` succeeds — never a guess.

Searched (MAE-NAS) backbones — weights of a DAMO-YOLO whose backbone is no T/S/M preset —
are recognised by :func:`match_searched` (the generic ``damo-yolo`` builder's matcher): the
backbone structure is *read back* from the convolution shapes (per stage: input/output
channels, bottleneck width, kernel size, block type from the first conv's kernel, depth from
the number of blocks; strides from the residual projections, every pattern tried where the
weights cannot tell), the neck's depth and hidden ratio from its first CSP stage, its output
channels from the head; the candidate is then built on the meta device and must fit every
key and shape. What the weights do not record — the activation — follows the layout as
upstream does (``res``: ReLU as T/S, ``csp``: SiLU as M); ``--model-arg act=...`` overrides.
A state dict a preset fits is left to the preset (one answer, never two).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from typing import Any

import torch

from damo_plugins.core.errors import DamoError
from damo_plugins.models.damo_yolo import PRESETS, build_damo_yolo, preset_structure
from damo_plugins.models.structure import K1KX, KXKX, STEM, Structure, describe_structure

#: depth multipliers tried (upstream's scaled models and the usual YOLO ones)
DEPTHS = (1.0, 0.5, 0.33, 0.67, 0.75, 0.25, 1.33, 1.5, 2.0)
#: width multipliers tried besides the ones the channel counts imply
WIDTHS = (1.0, 0.75, 0.5, 0.375, 0.25, 0.125, 1.25, 1.5, 2.0)


def strip_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Keys without a ``module.`` prefix (a checkpoint saved from DataParallel/DDP)."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _shapes(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def describe_keys(state: Mapping[str, Any]) -> str:
    """One phrase saying what a state dict holds (for the error when nothing matches)."""
    tops = sorted({k.split(".", 1)[0] for k in state})
    shown = ", ".join(f"{t}.*" for t in tops[:5]) + (", ..." if len(tops) > 5 else "")
    return f"{len(state)} tensors under {shown or 'nothing'}"


def _head_info(shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, int] | None:
    """(num_classes, reg_max) from the head's first-level convolutions, or None."""
    cls, reg = shapes.get("head.gfl_cls.0.weight"), shapes.get("head.gfl_reg.0.weight")
    if not cls or not reg or reg[0] % 4:
        return None
    return cls[0], reg[0] // 4 - 1


def _stage_channels(shapes: Mapping[str, tuple[int, ...]], layout: str) -> list[int]:
    """Widest convolution output of each backbone stage (the stage's output channels: the
    bottlenecks inside a block are never wider) — the width evidence."""
    stage = "backbone.csp_stage" if layout == "csp" else "backbone.block_list"
    widest: dict[int, int] = {}
    for k, s in shapes.items():
        if k.startswith(stage + ".") and len(s) == 4:
            i = int(k.split(".")[2])
            widest[i] = max(widest.get(i, 0), s[0])
    return [widest[i] for i in sorted(widest)]


def _width_candidates(preset: str, channels: list[int]) -> list[float]:
    """Widths whose rounded channel counts give every stage's channels (tried in order)."""
    # consecutive equal widths collapse: the CSP layout merges some structure entries into
    # one stage, so only the sequence of distinct widths is comparable across layouts
    base = _distinct([b["out"] for b in preset_structure(preset)])
    channels = _distinct(channels)
    if len(base) != len(channels):
        return []
    implied = [round(channels[-1] / base[-1], 4), round(channels[0] / base[0], 4)]
    out: list[float] = []
    for w in [*WIDTHS, *implied]:
        if w <= 0 or w > 4 or w in out:
            continue
        # every stage must fit: one stage alone allows many widths once rounded to 8s
        if all(_round8(b * w) == c for b, c in zip(base, channels)):
            out.append(w)
    return out


def _distinct(values: list[int]) -> list[int]:
    return [v for i, v in enumerate(values) if i == 0 or values[i - 1] != v]


def _round8(c: float) -> int:
    return max(8, int(c + 4) // 8 * 8)


#: the last answer per preset, keyed by the state dict's (key, shape) list: recognition asks
#: every preset matcher, and the searched-backbone matcher asks them again to defer to them
_PRESET_CACHE: dict[str, tuple[tuple[tuple[str, tuple[int, ...]], ...], Any]] = {}


def match_preset(state: Mapping[str, Any], preset: str) -> dict[str, Any] | None:
    """Builder kwargs of ``damo-yolo-<preset>`` that fit ``state`` exactly, or None.

    Only arguments that differ from the builder's defaults are returned (so the recorded
    architecture reads ``{"num_classes": 3}``, not a list of defaults).
    """
    shapes = _shapes(strip_prefix(state))
    key = tuple(sorted(shapes.items()))
    cached = _PRESET_CACHE.get(preset)
    if cached is not None and cached[0] == key:
        return dict(cached[1]) if cached[1] is not None else None
    found = _match_preset(shapes, preset)
    _PRESET_CACHE[preset] = (key, found)
    return dict(found) if found is not None else None


def _match_preset(shapes: dict[str, tuple[int, ...]], preset: str) -> dict[str, Any] | None:
    head = _head_info(shapes)
    if head is None:
        return None
    layout = "csp" if any(k.startswith("backbone.csp_stage.") for k in shapes) else "res"
    if PRESETS[preset]["layout"] != layout:
        return None
    channels = _stage_channels(shapes, layout)
    num_classes, reg_max = head
    if reg_max != 16:  # the presets' builder does not take reg_max
        return None
    deploy = any(".rbr_reparam." in k for k in shapes)
    rep_identity = any(".rbr_identity." in k for k in shapes)
    keys = set(shapes)
    # the neck's block count rules most depths out before anything is built
    neck_blocks = len(_indices(shapes, "neck.merge_3.convs"))
    neck_depth = float(PRESETS[preset]["neck_depth"])
    for width in _width_candidates(preset, channels):
        for depth in DEPTHS:
            if neck_blocks and max(1, round(3 * neck_depth * depth)) != neck_blocks:
                continue
            kwargs = {
                "num_classes": num_classes,
                "deploy": deploy,
                "width": width,
                "depth": depth,
                "rep_identity": rep_identity,
            }
            try:
                with torch.device("meta"):
                    model = build_damo_yolo(preset=preset, **kwargs)
            except DamoError:
                continue
            cand = _shapes(model.state_dict())
            if set(cand) == keys and cand == shapes:
                defaults = {
                    "num_classes": 80,
                    "deploy": False,
                    "width": 1.0,
                    "depth": 1.0,
                    "rep_identity": False,
                }
                return {k: v for k, v in kwargs.items() if defaults[k] != v}
    return None


def _matcher(preset: str) -> Any:
    def match_state_dict(state: Mapping[str, Any]) -> dict[str, Any] | None:
        return match_preset(state, preset)

    match_state_dict.__doc__ = (
        f"Kwargs of damo-yolo-{preset} (classes, width, depth, fused or not) for a state dict "
        "with exactly its keys and shapes, else None."
    )
    return match_state_dict


match_t = _matcher("t")
match_s = _matcher("s")
match_m = _matcher("m")

# ------------------------------------------------------------------ searched backbones
#: the most stride patterns tried when the weights cannot tell a stage's stride
MAX_STRIDE_PATTERNS = 64
#: neck hidden ratios preferred when several give the same rounded width (upstream's values)
NECK_RATIOS = (1.0, 0.75, 0.5, 1.25, 1.5, 2.0)

#: what :func:`match_searched` reads, for its errors
SEARCHED_CHECKED = (
    "backbone structure read from the conv shapes (stem; per stage in/out channels, "
    "bottleneck, kernel, block type, depth; strides from residual projections), neck depth "
    "and hidden ratio from neck.merge_3, neck outputs and classes from the head"
)


class _Unreadable(Exception):
    """The weights are DAMO-YOLO's but some part cannot be read back as a structure."""


def _conv_in_out(shapes: Mapping[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    shape = shapes.get(key)
    if shape is None or len(shape) != 4:
        raise _Unreadable(f"no 4-D weight {key}")
    return shape


def _res_block(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> dict[str, Any]:
    """A ``ResConvBlock`` at ``prefix``: conv1 (1x1 or kxk) -> RepConv kxk [+ projection]."""
    btn, cin, k1, _ = _conv_in_out(shapes, f"{prefix}.conv1.conv1.weight")
    conv2 = next(
        (
            shapes[f"{prefix}.conv2.{name}"]
            for name in ("rbr_dense.conv.weight", "rbr_reparam.weight", "conv1.weight")
            if f"{prefix}.conv2.{name}" in shapes
        ),
        None,
    )
    if conv2 is None or len(conv2) != 4 or conv2[1] != btn:
        raise _Unreadable(f"{prefix}.conv2 is not a {btn}-channel RepConv")
    k = conv2[2]
    if k1 not in (1, k):
        raise _Unreadable(f"{prefix}: first conv kernel {k1} is neither 1 nor {k}")
    return {
        "in": cin,
        "out": conv2[0],
        "btn": btn,
        "k": k,
        "class": K1KX if k1 == 1 else KXKX,
        "proj": f"{prefix}.residual_proj.conv1.weight" in shapes,
    }


def _indices(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> list[int]:
    """Sorted child indices ``i`` of keys ``{prefix}.{i}.*``."""
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in shapes if (m := pat.match(k))})


def _stem(shapes: Mapping[str, tuple[int, ...]], key: str) -> dict[str, Any]:
    out, cin4, k, _ = _conv_in_out(shapes, key)
    if cin4 % 4:
        raise _Unreadable(f"{key}: {cin4} input channels is not a Focus stem (4 x channels)")
    return {"class": STEM, "in": cin4 // 4, "out": out, "s": 1, "k": k}


def _read_res(shapes: Mapping[str, tuple[int, ...]]) -> tuple[Structure, list[list[int]]]:
    """``res`` layout: the structure (strides of ambiguous stages set to 2) and, per stage,
    the strides its weights allow (a stage with equal in/out channels and no projection
    could be either)."""
    stages = _indices(shapes, "backbone.block_list")
    if not stages or stages != list(range(len(stages))):
        raise _Unreadable("backbone.block_list stages are not numbered 0..n")
    structure: Structure = [_stem(shapes, "backbone.block_list.0.conv.conv.weight")]
    options: list[list[int]] = [[1]]
    for i in stages[1:]:
        prefix = f"backbone.block_list.{i}.block_list"
        blocks, spp_at = [], []
        for j in _indices(shapes, prefix):
            if f"{prefix}.{j}.conv1.conv1.weight" in shapes:
                blocks.append(_res_block(shapes, f"{prefix}.{j}"))
            elif f"{prefix}.{j}.conv1.conv.weight" in shapes:
                spp_at.append(j)
            else:
                raise _Unreadable(f"{prefix}.{j} is neither a residual block nor SPP")
        if not blocks:
            raise _Unreadable(f"backbone stage {i} has no residual block")
        first, rest = blocks[0], blocks[1:]
        if any(
            (b["out"], b["btn"], b["k"], b["class"], b["in"])
            != (first["out"], first["btn"], first["k"], first["class"], first["out"])
            for b in rest
        ):
            raise _Unreadable(f"backbone stage {i} mixes block shapes")
        if spp_at and (spp_at != [1] or i != stages[-1]):
            raise _Unreadable(
                f"SPP in backbone stage {i} at block {spp_at}: not where DAMO-YOLO puts it"
            )
        if first["proj"]:
            allowed = [1]
        elif first["in"] != first["out"]:
            allowed = [2]
        else:
            allowed = [2, 1]
        structure.append(
            {
                "class": first["class"],
                "in": first["in"],
                "out": first["out"],
                "s": allowed[0],
                "k": first["k"],
                "L": len(blocks),
                "btn": first["btn"],
            }
        )
        options.append(allowed)
    return structure, options


def _read_csp(shapes: Mapping[str, tuple[int, ...]]) -> Structure:
    """``csp`` layout: each wrapper is one stride-2 block (its downsampler counts as one of
    its ``L``), followed by the stride-1 blocks that joined it (runs of equal blocks)."""
    stages = _indices(shapes, "backbone.csp_stage")
    if not stages or stages != list(range(len(stages))):
        raise _Unreadable("backbone.csp_stage stages are not numbered 0..n")
    structure: Structure = [_stem(shapes, "backbone.csp_stage.0.conv.conv.weight")]
    for j in stages[1:]:
        prefix = f"backbone.csp_stage.{j}"
        width2, cin, _, _ = _conv_in_out(shapes, f"{prefix}.downsampler.conv.conv1.weight")
        hidden = width2 // 2
        blocks = [
            _res_block(shapes, f"{prefix}.convstem.{m}")
            for m in _indices(shapes, f"{prefix}.convstem")
        ]
        cout = (
            _conv_in_out(shapes, f"{prefix}.conv_fuse.conv.conv1.weight")[0] if blocks else width2
        )
        runs: list[list[dict[str, Any]]] = []

        def sig(b: dict[str, Any]) -> tuple[Any, ...]:
            return (b["out"], b["btn"], b["k"], b["class"])

        for b in blocks:
            if runs and sig(runs[-1][0]) == sig(b):
                runs[-1].append(b)
            else:
                runs.append([b])
        own = runs.pop(0) if runs and runs[0][0]["out"] == hidden else []
        ref = own[0] if own else (runs[0][0] if runs else None)
        structure.append(
            {
                "class": ref["class"] if ref else KXKX,
                "in": cin,
                "out": width2,
                "s": 2,
                "k": ref["k"] if own else 3,
                "L": len(own) + 1,
                "btn": ref["btn"] if own else max(1, hidden),
            }
        )
        for n, run in enumerate(runs):
            half = run[0]["out"]
            out = cout if n == len(runs) - 1 and cout // 2 == half else 2 * half
            structure.append(
                {
                    "class": run[0]["class"],
                    "in": structure[-1]["out"],
                    "out": out,
                    "s": 1,
                    "k": run[0]["k"],
                    "L": len(run),
                    "btn": run[0]["btn"],
                }
            )
    return structure


def _neck_options(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Neck depth (blocks per CSP stage / 3), hidden ratio and output channels."""
    n = len(_indices(shapes, "neck.merge_3.convs"))
    if n == 0:
        raise _Unreadable("no neck.merge_3.convs blocks (not a RepGFPN neck)")
    mid, hidden = _conv_in_out(shapes, "neck.merge_3.convs.0.conv1.conv.weight")[:2]
    ratio = next((r for r in NECK_RATIOS if int(mid * r) == hidden), None)
    if ratio is None:
        ratio = (hidden + 0.5) / mid  # int(mid * ratio) == hidden, away from float edges
    outs = []
    for i in range(3):
        outs.append(_conv_in_out(shapes, f"head.gfl_cls.{i}.weight")[1])
    return {
        "neck_depth": round(n / 3, 6),
        "neck_hidden_ratio": ratio,
        "neck_out_channels": outs,
    }


def match_searched(state: Mapping[str, Any]) -> dict[str, Any] | None:
    """Kwargs of the generic ``damo-yolo`` builder (``backbone=`` a structure read back from
    the weights) that fit ``state`` exactly; None for weights that are not DAMO-YOLO's or
    that a T/S/M preset fits.

    Raises :class:`DamoError` for DAMO-YOLO weights no buildable structure fits, saying what
    was read and where the closest candidate differs.
    """
    shapes = _shapes(strip_prefix(state))
    head = _head_info(shapes)
    csp = any(k.startswith("backbone.csp_stage.") for k in shapes)
    res = any(k.startswith("backbone.block_list.") for k in shapes)
    if head is None or csp == res or not any(k.startswith("neck.") for k in shapes):
        return None  # not a DAMO-YOLO state dict: some other builder's business
    layout = "csp" if csp else "res"
    if any(match_preset(state, p) is not None for p in PRESETS if PRESETS[p]["layout"] == layout):
        return None
    num_classes, reg_max = head
    try:
        if layout == "res":
            structure, options = _read_res(shapes)
        else:
            structure = _read_csp(shapes)
            options = [[b["s"]] for b in structure]
        neck = _neck_options(shapes)
    except _Unreadable as exc:
        raise DamoError(
            f"DAMO-YOLO weights ({layout} layout) whose backbone cannot be read back as a "
            f"structure: {exc} (checked: {SEARCHED_CHECKED}; presets T/S/M: {CHECKED})",
            "name the architecture: --arch damo-yolo --model-arg backbone=STRUCTURE.json",
        ) from None
    kwargs: dict[str, Any] = {
        "layout": layout,
        "act": "silu" if layout == "csp" else "relu",
        "num_classes": num_classes,
        "reg_max": reg_max,
        "deploy": any(".rbr_reparam." in k for k in shapes),
        "rep_identity": any(".rbr_identity." in k for k in shapes),
        **neck,
    }
    patterns = list(itertools.islice(itertools.product(*options), MAX_STRIDE_PATTERNS))
    fits: list[Structure] = []
    # the candidate that differs in the fewest tensors: what the error describes
    closest: tuple[int, str, Structure] | None = None
    for strides in patterns:
        cand_structure = [dict(b, s=s) for b, s in zip(structure, strides)]
        try:
            with torch.device("meta"):
                model = build_damo_yolo(cand_structure, **kwargs)
        except DamoError as exc:
            if closest is None:
                closest = (len(shapes) + 1, exc.message, cand_structure)
            continue
        count, diff = _difference(_shapes(model.state_dict()), shapes)
        if count == 0:
            fits.append(cand_structure)
        elif closest is None or count < closest[0]:
            closest = (count, diff, cand_structure)
    described = describe_structure(structure)
    if len(fits) > 1:
        raise DamoError(
            f"the DAMO-YOLO weights fit {len(fits)} backbones that differ only in their "
            f"strides ({'; '.join(str([b['s'] for b in f]) for f in fits)}): {described}",
            "name the architecture: --arch damo-yolo --model-arg backbone=STRUCTURE.json",
        )
    if not fits:
        why = closest[1] if closest else "no stride pattern builds"
        described = describe_structure(closest[2]) if closest else described
        raise DamoError(
            f"DAMO-YOLO weights ({layout} layout, read back as: {described}; neck depth "
            f"{neck['neck_depth']}, hidden ratio {neck['neck_hidden_ratio']:g}) that no "
            f"buildable model fits: {why} "
            f"(checked: {SEARCHED_CHECKED}; {len(patterns)} stride pattern(s); presets T/S/M: "
            f"{CHECKED})",
            "name the architecture: --arch damo-yolo --model-arg backbone=STRUCTURE.json",
        )
    kwargs["backbone"] = fits[0]
    defaults = {"reg_max": 16, "deploy": False, "rep_identity": False}
    return {k: v for k, v in kwargs.items() if defaults.get(k, object()) != v}


def _difference(
    cand: Mapping[str, tuple[int, ...]], shapes: Mapping[str, tuple[int, ...]]
) -> tuple[int, str]:
    """How many tensors a candidate's state dict gets wrong, and the first of them."""
    missing = sorted(set(shapes) - set(cand))
    extra = sorted(set(cand) - set(shapes))
    wrong = [k for k in shapes if k in cand and cand[k] != shapes[k]]
    count = len(missing) + len(extra) + len(wrong)
    if missing:
        return count, f"the weights have {missing[0]} (and {len(missing) - 1} more) it lacks"
    if extra:
        return count, f"it needs {extra[0]} (and {len(extra) - 1} more) the weights lack"
    if wrong:
        k = wrong[0]
        return count, (
            f"{k} is {list(shapes[k])} in the weights, {list(cand[k])} in the candidate "
            f"({len(wrong)} tensor(s) differ)"
        )
    return 0, ""


#: what the matchers look at, for the error when no builder recognises a state dict
CHECKED = (
    "layout (backbone.block_list / csp_stage), fused or training-time RepConvs, classes and "
    f"reg_max from head.gfl_cls/gfl_reg, width from the backbone channels, depth in {DEPTHS}"
)


def _attach() -> None:
    """Give the preset builders their matcher (the ``match_state_dict`` builder attribute
    that :func:`damo_plugins.core.artifact.load_model` asks for a weights-only checkpoint)."""
    from damo_plugins.models import damo_yolo

    for preset, matcher in (("t", match_t), ("s", match_s), ("m", match_m)):
        builder = getattr(damo_yolo, f"build_damo_yolo_{preset}")
        builder.match_state_dict = matcher


_attach()
from damo_plugins.models.damo_yolo import (  # noqa: E402  (re-exported, matchers attached)
    build_damo_yolo_m,
    build_damo_yolo_s,
    build_damo_yolo_t,
)

__all__ = [
    "build_damo_yolo_m",
    "build_damo_yolo_s",
    "build_damo_yolo_t",
    "match_preset",
    "match_searched",
]
