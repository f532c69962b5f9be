"""Torch backbones of a structure: a plain one for the entropy score, and the detector's.

* :class:`PlainBackbone` is the searched structure and nothing more (Focus, stem, residual
  units; no SPP, no CSP wrappers, no RepConv): what MAE-NAS's ``entropy`` score runs, with
  BN, activations and shortcuts bypassed.
* :func:`detector_backbone` is the backbone DAMO-YOLO's model builder makes of the
  structure (``damo_plugins.models``: SPP, CSP layout for ``kxkx``, RepConvs): what the
  analytic params/FLOPs of :mod:`damo_plugins.nas.analysis` count exactly and what latency
  measurements time.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from damo_plugins.models.structure import K1KX, KXKX, STEM, Structure, validate_structure


class Focus(nn.Module):
    """Space-to-depth: (B, C, H, W) -> (B, 4C, H/2, W/2), in DAMO-YOLO's slice order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            (x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]), dim=1
        )


class ConvUnit(nn.Module):
    """Conv (+ BatchNorm) (+ ReLU). Without BN the conv carries a bias (a folded BN)."""

    def __init__(
        self, cin: int, cout: int, k: int, s: int, *, bn: bool, act: bool, bias: bool
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=bias and not bn)
        self.bn = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class ResUnit(nn.Module):
    """conv1 (1x1 or kxk) -> act -> conv2 (kxk, stride) [+ shortcut] -> act."""

    def __init__(
        self,
        cin: int,
        cout: int,
        btn: int,
        k: int,
        s: int,
        k1kx: bool,
        *,
        bn: bool,
        act: bool,
        bias: bool,
    ) -> None:
        super().__init__()
        self.conv1 = ConvUnit(cin, btn, 1 if k1kx else k, 1, bn=bn, act=act, bias=bias)
        self.conv2 = ConvUnit(btn, cout, k, s, bn=bn, act=False, bias=bias)
        self.shortcut = s == 1
        self.proj = (
            ConvUnit(cin, cout, 1, 1, bn=bn, act=False, bias=bias)
            if s == 1 and cin != cout
            else None
        )
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x))
        if self.shortcut:
            y = y + (self.proj(x) if self.proj is not None else x)
        return self.act(y)


class PlainBackbone(nn.Module):
    """Backbone of a structure; returns the outputs of the blocks in ``out_indices``.

    ``bn=False, act=False`` gives the bare conv chain the entropy score measures;
    ``bn=False, bias=True`` a deploy-like network (BN folded) for latency measurement.
    """

    def __init__(
        self,
        structure: Structure,
        *,
        focus: bool = True,
        bn: bool = True,
        act: bool = True,
        bias: bool = True,
        out_indices: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        structure = validate_structure(structure)
        self.structure = structure
        self.focus = Focus() if focus else None
        self.blocks = nn.ModuleList()
        for b in structure:
            if b["class"] == STEM:
                cin = b["in"] * (4 if focus else 1)
                s = 1 if focus else b["s"]  # DAMO-YOLO's Focus stem ignores 's'
                self.blocks.append(ConvUnit(cin, b["out"], b["k"], s, bn=bn, act=act, bias=bias))
                continue
            units = nn.Sequential()
            for j in range(b["L"]):
                cin = b["in"] if j == 0 else b["out"]
                s = b["s"] if j == 0 else 1
                units.append(
                    ResUnit(
                        cin,
                        b["out"],
                        b["btn"],
                        b["k"],
                        s,
                        b["class"] == K1KX,
                        bn=bn,
                        act=act,
                        bias=bias,
                    )
                )
            self.blocks.append(units)
        n = len(structure)
        self.out_indices = (
            tuple(out_indices) if out_indices is not None else tuple(range(max(0, n - 3), n))
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.focus is not None:
            x = self.focus(x)
        outs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.out_indices:
                outs.append(x)
        return outs

    @torch.no_grad()
    def entropy_forward(self, x: torch.Tensor) -> list[float]:
        """Log std gain of each block, normalising after every unit (MAE-NAS entropy forward).

        Only the main path (conv1 -> conv2) of each unit is run: BN, activations and shortcuts
        are bypassed, as in the published method.
        """
        if self.focus is not None:
            x = self.focus(x)
        x = x / x.std()
        per_block: list[float] = []
        for block in self.blocks:
            convs = (
                [block.conv]
                if isinstance(block, ConvUnit)
                else [(u.conv1.conv, u.conv2.conv) for u in block]
            )
            total = 0.0
            for item in convs:
                y = x
                for conv in item if isinstance(item, tuple) else (item,):
                    y = conv(y)
                std = float(y.std())
                total += math.log(std)
                x = y / std
            per_block.append(total)
        return per_block


def detector_backbone(
    structure: Structure, *, focus: bool = True, deploy: bool = True, act: str | None = None
) -> nn.Module:
    """The backbone ``build_damo_yolo(backbone=structure, deploy=deploy)`` builds.

    Same classes and choices as the builder (``csp`` layout and SiLU when any block is
    ``kxkx``, else ``res`` and ReLU), without the neck and head, and returning only the last
    feature map (every block runs either way). ``focus=False`` swaps the Focus stem for a
    plain conv on the image (stride ``s``): the bare structure that ``--no-focus`` scores.
    """
    from damo_plugins.models.backbone import TinyNASCSP, TinyNASRes, csp_groups
    from damo_plugins.models.blocks import ConvBNAct

    structure = validate_structure(structure)
    csp = any(b["class"] == KXKX for b in structure)
    act = act or ("silu" if csp else "relu")
    if csp:
        net: nn.Module = TinyNASCSP(
            structure, (len(csp_groups(structure)) - 1,), act, deploy=deploy
        )
        stages = net.csp_stage
    else:
        net = TinyNASRes(structure, (len(structure) - 1,), act, deploy=deploy)
        stages = net.block_list
    if not focus:
        stem = structure[0]
        stages[0] = ConvBNAct(stem["in"], stem["out"], stem["k"], stem["s"], act=act)
    return net
