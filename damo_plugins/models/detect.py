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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from damo_plugins.core.errors import DamoError
from damo_plugins.models.damo_yolo import PRESETS, build_damo_yolo, preset_structure

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


def match_preset(state: Mapping[str, Any], preset: str) -> dict[str, Any] | None:
    """Builder kwargs of ``damo-yolo-<preset>`` that fit ``state`` exactly, or None.

    Only arguments that differ from the builder's defaults are returned (so the recorded
    architecture reads ``{"num_classes": 3}``, not a list of defaults).
    """
    state = strip_prefix(state)
    shapes = _shapes(state)
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
    for width in _width_candidates(preset, channels):
        for depth in DEPTHS:
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

__all__ = ["build_damo_yolo_m", "build_damo_yolo_s", "build_damo_yolo_t", "match_preset"]
