"""DAMO-YOLO detectors: TinyNAS backbone + RepGFPN neck + ZeroHead.

Presets ``t``, ``s`` and ``m`` reproduce DAMO-YOLO-T/S/M (official structures in
``damo_plugins/assets``); :func:`build_damo_yolo` builds any variant from a backbone
structure (a list, a JSON file or DAMO-YOLO's literal ``.txt``) plus neck/head settings, so
that NAS-found backbones and reduced-width models for small inputs use the same code.

The model takes ``images [N, 3, H, W]`` (H, W multiples of 32) and returns ``scores [N, A, C]``
and ``boxes [N, A, 4]`` (xyxy, input pixels). Its state dict uses the official key names
(``backbone.*``, ``neck.*``, ``head.*``), so the ``model`` entry of a released checkpoint loads
with ``strict=True``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from damo_plugins.core.errors import DamoError
from damo_plugins.models.backbone import TinyNASCSP, TinyNASRes, default_out_indices
from damo_plugins.models.head import ZeroHead
from damo_plugins.models.neck import GiraffeNeckV2
from damo_plugins.models.structure import KXKX, STEM, Structure, load_structure, parse_structure

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_INPUT_SHAPE = [1, 3, 640, 640]


@dataclass
class DamoYoloConfig:
    """Everything that defines a DAMO-YOLO architecture (JSON-able)."""

    structure: Structure
    layout: str = "res"  # "res" (T, S) or "csp" (M)
    act: str = "relu"  # backbone and neck activation
    out_indices: list[int] | None = None  # default: last blocks at strides 8/16/32
    neck_depth: float = 1.0
    neck_hidden_ratio: float = 1.0
    neck_out_channels: list[int] | None = None  # default: the backbone's output channels
    num_classes: int = 80
    reg_max: int = 16
    rep_identity: bool = False  # RepVGG-style identity-BN branch in RepConvs where possible
    deploy: bool = False  # build RepConvs already fused


PRESETS: dict[str, dict[str, Any]] = {
    "t": {
        "structure": "tinynas_L20_k1kx.json",
        "layout": "res",
        "act": "relu",
        "neck_depth": 1.0,
        "neck_hidden_ratio": 1.0,
        "neck_out_channels": [64, 128, 256],
    },
    "s": {
        "structure": "tinynas_L25_k1kx.json",
        "layout": "res",
        "act": "relu",
        "neck_depth": 1.0,
        "neck_hidden_ratio": 0.75,
        "neck_out_channels": [128, 256, 512],
    },
    "m": {
        "structure": "tinynas_L35_kxkx.json",
        "layout": "csp",
        "act": "silu",
        "neck_depth": 1.5,
        "neck_hidden_ratio": 1.0,
        "neck_out_channels": [128, 256, 512],
    },
}


class DamoYolo(nn.Module):
    """A DAMO-YOLO detector (``backbone``, ``neck``, ``head``)."""

    input_names = ["images"]
    output_names = ["scores", "boxes"]
    default_input_shape = DEFAULT_INPUT_SHAPE

    def __init__(self, config: DamoYoloConfig) -> None:
        super().__init__()
        self.config = config
        rep = {"rep_identity": config.rep_identity, "deploy": config.deploy}
        out_indices = config.out_indices or default_out_indices(config.structure, config.layout)
        backbone_cls = TinyNASCSP if config.layout == "csp" else TinyNASRes
        self.backbone = backbone_cls(config.structure, out_indices, config.act, **rep)
        in_ch = self.backbone.out_channels
        out_ch = config.neck_out_channels or in_ch
        self.neck = GiraffeNeckV2(
            in_ch, out_ch, config.neck_depth, config.neck_hidden_ratio, config.act, **rep
        )
        self.head = ZeroHead(config.num_classes, out_ch, reg_max=config.reg_max)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Neck outputs at strides 8, 16, 32 (what distillation compares)."""
        return tuple(self.neck(self.backbone(images)))

    def raw_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Undecoded head outputs (see :meth:`ZeroHead.forward_levels`), for training."""
        return self.head.forward_levels(self.features(images))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.neck(self.backbone(images)))


# ------------------------------------------------------------------------ structures
def read_backbone(backbone: Any) -> Structure:
    """A structure from a list of dicts, a JSON/literal text, or a file path."""
    if isinstance(backbone, (list, tuple)):
        return parse_structure(backbone)
    if isinstance(backbone, Mapping):
        return parse_structure([backbone] if "class" in backbone else backbone)  # type: ignore[list-item]
    if isinstance(backbone, (str, Path)):
        text = str(backbone).strip()
        if text.startswith(("[", "{")):
            return parse_structure(text)
        return load_structure(text)
    raise DamoError(
        f"backbone must be a structure list or a file path, not {type(backbone).__name__}",
        "pass a .json / .txt structure file",
    )


def preset_structure(name: str) -> Structure:
    return load_structure(ASSETS / PRESETS[name]["structure"])


def _round_channels(c: float, divisor: int = 8) -> int:
    return max(divisor, int(c + divisor / 2) // divisor * divisor)


def scale_structure(structure: Structure, width: float = 1.0, depth: float = 1.0) -> Structure:
    """Scale channels (to multiples of 8) and block counts (at least 1) of a structure."""
    if width == 1.0 and depth == 1.0:
        return copy.deepcopy(structure)
    out: Structure = []
    for b in structure:
        nb = dict(b)
        nb["out"] = _round_channels(b["out"] * width)
        nb["in"] = b["in"] if b["class"] == STEM else out[-1]["out"]
        if "btn" in nb:
            nb["btn"] = _round_channels(b["btn"] * width)
        if "L" in nb:
            nb["L"] = max(1, round(b["L"] * depth))
        out.append(nb)
    return parse_structure(out)


# -------------------------------------------------------------------------- builders
def build_damo_yolo(
    backbone: Any = None,
    *,
    preset: str | None = None,
    num_classes: int = 80,
    deploy: bool = False,
    width: float = 1.0,
    depth: float = 1.0,
    layout: str | None = None,
    act: str | None = None,
    out_indices: Sequence[int] | None = None,
    neck_depth: float | None = None,
    neck_hidden_ratio: float | None = None,
    neck_out_channels: Sequence[int] | None = None,
    reg_max: int = 16,
    rep_identity: bool = False,
) -> DamoYolo:
    """Build a DAMO-YOLO model.

    ``preset`` (``t``/``s``/``m``) gives the defaults of the official model; ``backbone``
    replaces its structure (a list, or a ``.json``/``.txt`` file). Without a preset the layout
    is ``csp`` for ``SuperResConvKXKX`` structures and ``res`` otherwise, as upstream.
    ``width``/``depth`` scale backbone and neck channels / block counts (for small inputs).
    """
    base: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise DamoError(f"unknown DAMO-YOLO preset {preset!r}", f"one of {', '.join(PRESETS)}")
        base = dict(PRESETS[preset])
    if backbone is None and preset is None:
        raise DamoError(
            "damo-yolo needs a backbone structure", "pass backbone=<structure file or list>"
        )
    for name, value in (("num_classes", num_classes), ("reg_max", reg_max)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise DamoError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("width", width), ("depth", depth)):
        if not isinstance(value, (int, float)) or not 0 < value <= 4:
            raise DamoError(f"{name} must be a number in (0, 4], got {value!r}")
    structure = read_backbone(backbone) if backbone is not None else preset_structure(preset)  # type: ignore[arg-type]
    structure = scale_structure(structure, float(width), float(depth))
    if layout is None:
        layout = base.get("layout") or (
            "csp" if any(b["class"] == KXKX for b in structure) else "res"
        )
    if layout not in ("res", "csp"):
        raise DamoError(f"unknown backbone layout {layout!r}", "res or csp")
    act = act or base.get("act") or ("silu" if layout == "csp" else "relu")
    if act not in ("relu", "silu"):
        raise DamoError(f"unsupported activation {act!r}", "relu or silu")
    if neck_out_channels is None and "neck_out_channels" in base:
        neck_out_channels = [_round_channels(c * width) for c in base["neck_out_channels"]]
    try:
        indices = (
            list(out_indices) if out_indices is not None else default_out_indices(structure, layout)
        )
    except ValueError as exc:
        raise DamoError(f"backbone structure does not fit DAMO-YOLO: {exc}") from None
    config = DamoYoloConfig(
        structure=structure,
        layout=layout,
        act=act,
        out_indices=indices,
        neck_depth=float(neck_depth if neck_depth is not None else base.get("neck_depth", 1.0))
        * depth,
        neck_hidden_ratio=float(
            neck_hidden_ratio
            if neck_hidden_ratio is not None
            else base.get("neck_hidden_ratio", 1.0)
        ),
        neck_out_channels=list(neck_out_channels) if neck_out_channels is not None else None,
        num_classes=num_classes,
        reg_max=reg_max,
        rep_identity=rep_identity,
        deploy=deploy,
    )
    try:
        return DamoYolo(config)
    except (ValueError, RuntimeError) as exc:
        raise DamoError(f"cannot build this DAMO-YOLO variant: {exc}") from None


def normalize_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Builder arguments as plain data: a ``backbone`` file is replaced by its structure.

    Saved checkpoints record the builder's arguments to rebuild the architecture; recording
    the structure itself keeps them valid after the structure file is moved or deleted.
    """
    out = dict(kwargs)
    if isinstance(out.get("backbone"), (str, Path)):
        out["backbone"] = read_backbone(out["backbone"])
    return out


def _preset_builder(preset: str) -> Any:
    def builder(
        num_classes: int = 80,
        backbone: Any = None,
        deploy: bool = False,
        width: float = 1.0,
        depth: float = 1.0,
        rep_identity: bool = False,
    ) -> DamoYolo:
        return build_damo_yolo(
            backbone,
            preset=preset,
            num_classes=num_classes,
            deploy=deploy,
            width=width,
            depth=depth,
            rep_identity=rep_identity,
        )

    builder.__name__ = f"build_damo_yolo_{preset}"
    builder.__doc__ = (
        f"DAMO-YOLO-{preset.upper()} (official architecture; ``backbone`` replaces the structure, "
        "``width``/``depth`` scale it, ``deploy`` builds RepConvs fused)."
    )
    builder.default_input_shape = DEFAULT_INPUT_SHAPE  # type: ignore[attr-defined]
    builder.normalize_kwargs = normalize_kwargs  # type: ignore[attr-defined]
    return builder


build_damo_yolo_t = _preset_builder("t")
build_damo_yolo_s = _preset_builder("s")
build_damo_yolo_m = _preset_builder("m")
build_damo_yolo.default_input_shape = DEFAULT_INPUT_SHAPE  # type: ignore[attr-defined]
build_damo_yolo.normalize_kwargs = normalize_kwargs  # type: ignore[attr-defined]


def _match_searched(state: Mapping[str, Any]) -> dict[str, Any] | None:
    """The generic builder's ``match_state_dict``: a searched backbone read back from the
    weights (:func:`damo_plugins.models.detect.match_searched`; imported on use, as that
    module imports this one)."""
    from damo_plugins.models.detect import match_searched

    return match_searched(state)


build_damo_yolo.match_state_dict = _match_searched  # type: ignore[attr-defined]
