"""TinyNAS backbones built from a *structure* (see :mod:`damo_plugins.models.structure`).

Two layouts, as in DAMO-YOLO:

* ``res`` (T, S): the blocks run in sequence; each ``SuperResConv*`` stage is a list of
  residual blocks (``block_list``); the last stage gets an SPP block after its first block.
* ``csp`` (M): every stage after the stem is wrapped in a CSP stage with its own stride-2
  downsampler (``csp_stage``); a stride-1 stage joins the wrapper of the stage before it
  (in the official L35 structure stages 3 and 4 share one wrapper); the last wrapper gets
  SPP after its downsampler. Upstream builds these wrappers with ReLU whatever ``act`` is
  (only the residual blocks, the Focus stem and SPP follow ``act``/SiLU); we do the same so
  that official weights compute what they were trained to compute.

The backbone returns the features of the blocks in ``out_indices`` (strides 8, 16, 32).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from damo_plugins.models.blocks import (
    ConvKXBN,
    ConvKXBNRELU,
    Focus,
    RepConv,
    SPPBottleneck,
    activation,
)
from damo_plugins.models.structure import K1KX, STEM


class ResConvBlock(nn.Module):
    """conv1 (1x1 for k1kx, kxk for kxkx) -> act -> conv2 (RepConv kxk) [+ shortcut] -> act."""

    def __init__(
        self,
        cin: int,
        cout: int,
        btn: int,
        k: int,
        stride: int,
        act: str,
        kind: str,
        reparam: bool = True,
        rep_identity: bool = False,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = ConvKXBN(cin, btn, 1 if kind == K1KX else k, 1)
        if reparam:
            self.conv2: nn.Module = RepConv(
                btn, cout, k, stride, act=None, identity=rep_identity, deploy=deploy
            )
        else:
            self.conv2 = ConvKXBN(btn, cout, k, stride)
        self.activation_function = activation(act)
        self.residual_proj = ConvKXBN(cin, cout, 1, 1) if cin != cout and stride != 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.residual_proj(x) if self.residual_proj is not None else x
        y = self.conv2(self.activation_function(self.conv1(x)))
        if self.stride != 2:
            y = y + shortcut
        return self.activation_function(y)


class SuperResStem(nn.Module):
    """One ``res``-layout stage: ``L`` residual blocks (+ SPP after the first, if asked)."""

    def __init__(self, block: dict[str, Any], act: str, with_spp: bool, **rep: Any) -> None:
        super().__init__()
        self.block_list = nn.ModuleList()
        for i in range(block["L"]):
            cin = block["in"] if i == 0 else block["out"]
            stride = block["s"] if i == 0 else 1
            self.block_list.append(
                ResConvBlock(
                    cin, block["out"], block["btn"], block["k"], stride, act, block["class"], **rep
                )
            )
            if i == 0 and with_spp:
                self.block_list.append(SPPBottleneck(block["out"], block["out"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block_list:
            x = block(x)
        return x


class CSPWrapper(nn.Module):
    """A ``csp``-layout stage: downsample, split, residual blocks on one half, concat, fuse."""

    def __init__(
        self, blocks: Sequence[dict[str, Any]], act: str, with_spp: bool, **rep: Any
    ) -> None:
        super().__init__()
        cin, cout = blocks[0]["in"], blocks[-1]["out"]
        hidden = blocks[0]["out"] // 2
        self.with_spp = with_spp
        self.convstem = nn.ModuleList()
        prev = hidden
        for b in blocks:
            half = b["out"] // 2
            # A stride-2 stage spends one of its L blocks on the downsampler.
            for _ in range(b["L"] - 1 if b["s"] == 2 else b["L"]):
                self.convstem.append(
                    ResConvBlock(prev, half, b["btn"], b["k"], 1, act, b["class"], **rep)
                )
                prev = half
        self.downsampler = ConvKXBNRELU(cin, hidden * 2, 3, 2, act="relu")
        if with_spp:
            self.spp = SPPBottleneck(hidden * 2, hidden * 2)
        if len(self.convstem) > 0:
            self.conv_start = ConvKXBNRELU(hidden * 2, hidden, 1, 1, act="relu")
            self.conv_shortcut = ConvKXBNRELU(hidden * 2, cout // 2, 1, 1, act="relu")
            self.conv_fuse = ConvKXBNRELU(prev + cout // 2, cout, 1, 1, act="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsampler(x)
        if self.with_spp:
            x = self.spp(x)
        if len(self.convstem) == 0:
            return x
        shortcut = self.conv_shortcut(x)
        x = self.conv_start(x)
        for block in self.convstem:
            x = block(x)
        return self.conv_fuse(torch.cat((x, shortcut), dim=1))


def _stem(block: dict[str, Any], act: str) -> Focus:
    return Focus(block["in"], block["out"], block["k"], act=act)


def res_stage_strides(structure: Sequence[dict[str, Any]]) -> list[int]:
    """Cumulative stride after each top-level ``res`` block (the Focus stem halves)."""
    strides, total = [], 1
    for b in structure:
        total *= 2 if b["class"] == STEM else b["s"]
        strides.append(total)
    return strides


def csp_groups(structure: Sequence[dict[str, Any]]) -> list[list[int]]:
    """Structure indices per ``csp_stage`` entry: the stem alone, then one wrapper per stage,
    a stride-1 stage joining the wrapper before it (not the stem's)."""
    groups: list[list[int]] = [[0]]
    for i in range(1, len(structure)):
        if structure[i]["s"] == 1 and len(groups) > 1:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class TinyNASRes(nn.Module):
    """``res`` layout: ``block_list`` = [Focus stem, stage, stage, ...]."""

    def __init__(
        self, structure: Sequence[dict[str, Any]], out_indices: Sequence[int], act: str, **rep: Any
    ) -> None:
        super().__init__()
        self.out_indices = tuple(out_indices)
        self.block_list = nn.ModuleList()
        last = len(structure) - 1
        for i, b in enumerate(structure):
            if b["class"] == STEM:
                self.block_list.append(_stem(b, act))
            else:
                self.block_list.append(SuperResStem(b, act, with_spp=i == last, **rep))
        self.out_channels = [structure[i]["out"] for i in self.out_indices]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, block in enumerate(self.block_list):
            x = block(x)
            if i in self.out_indices:
                feats.append(x)
        return feats


class TinyNASCSP(nn.Module):
    """``csp`` layout: ``csp_stage`` = [Focus stem, CSPWrapper, ...]."""

    def __init__(
        self, structure: Sequence[dict[str, Any]], out_indices: Sequence[int], act: str, **rep: Any
    ) -> None:
        super().__init__()
        self.out_indices = tuple(out_indices)
        groups = csp_groups(structure)
        self.csp_stage = nn.ModuleList([_stem(structure[0], act)])
        for j, idx in enumerate(groups[1:], start=1):
            blocks = [structure[i] for i in idx]
            self.csp_stage.append(CSPWrapper(blocks, act, with_spp=j == len(groups) - 1, **rep))
        self.out_channels = [structure[groups[i][-1]]["out"] for i in self.out_indices]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, stage in enumerate(self.csp_stage):
            x = stage(x)
            if i in self.out_indices:
                feats.append(x)
        return feats


def default_out_indices(structure: Sequence[dict[str, Any]], layout: str) -> list[int]:
    """Indices of the last top-level block at strides 8, 16 and 32."""
    if layout == "csp":
        strides = [2 * 2**j for j in range(len(csp_groups(structure)))]
    else:
        strides = res_stage_strides(structure)
    out = []
    for target in (8, 16, 32):
        idx = [i for i, s in enumerate(strides) if s == target]
        if not idx:
            raise ValueError(f"the backbone has no block at stride {target} (strides: {strides})")
        out.append(idx[-1])
    return out
