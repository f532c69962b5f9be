"""A minimal plain backbone built from a structure, for the entropy score and FLOPs checks.

It follows DAMO-YOLO's ``TinyNAS_res`` layout (Focus, stem, residual units; see
:mod:`damo_plugins.nas.analysis` for the exact convolutions) and nothing more: no SPP, no
RepConv, ReLU activations. The detector's real backbone lives in ``damo_plugins.models``;
this one exists so the NAS package can measure what it predicts (entropy, FLOPs, latency)
without depending on it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from damo_plugins.models.structure import K1KX, STEM, Structure, validate_structure


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
                self.blocks.append(
                    ConvUnit(cin, b["out"], b["k"], b["s"], bn=bn, act=act, bias=bias)
                )
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
