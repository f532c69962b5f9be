"""RepGFPN neck (DAMO-YOLO's ``GiraffeNeckV2``): CSP stages of reversed RepConv blocks.

Five fusion nodes combine the backbone's stride-8/16/32 features top-down and bottom-up and
return three maps (strides 8, 16, 32) with ``out_channels``. Module names follow upstream.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from damo_plugins.models.blocks import ConvBNAct, RepConv


class BasicBlock_3x3_Reverse(nn.Module):
    """RepConv 3x3 (``conv2``, to the hidden width) -> ConvBNAct 3x3 (``conv1``) -> + input."""

    def __init__(
        self,
        channels: int,
        hidden_ratio: float,
        act: str,
        rep_identity: bool = False,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        hidden = int(channels * hidden_ratio)
        self.conv1 = ConvBNAct(hidden, channels, 3, act=act)
        self.conv2 = RepConv(channels, hidden, 3, 1, act=act, identity=rep_identity, deploy=deploy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv1(self.conv2(x))


class CSPStage(nn.Module):
    """Split with two 1x1 convs, ``n`` blocks on one half, concat every block's output, fuse."""

    def __init__(
        self, cin: int, hidden_ratio: float, cout: int, n: int, act: str, **rep: bool
    ) -> None:
        super().__init__()
        first = cout // 2
        mid = cout - first
        self.conv1 = ConvBNAct(cin, first, 1, act=act)
        self.conv2 = ConvBNAct(cin, mid, 1, act=act)
        self.convs = nn.Sequential(
            *[BasicBlock_3x3_Reverse(mid, hidden_ratio, act, **rep) for _ in range(n)]
        )
        self.conv3 = ConvBNAct(mid * n + first, cout, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self.conv1(x)]
        y = self.conv2(x)
        for block in self.convs:
            y = block(y)
            outs.append(y)
        return self.conv3(torch.cat(outs, dim=1))


class GiraffeNeckV2(nn.Module):
    """RepGFPN. ``in_channels``/``out_channels`` are for strides (8, 16, 32)."""

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: Sequence[int],
        depth: float = 1.0,
        hidden_ratio: float = 1.0,
        act: str = "relu",
        **rep: bool,
    ) -> None:
        super().__init__()
        c8, c16, c32 = in_channels
        o8, o16, o32 = out_channels
        n = max(1, round(3 * depth))
        self.in_channels, self.out_channels = list(in_channels), list(out_channels)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.bu_conv13 = ConvBNAct(c16, c16, 3, 2, act=act)
        self.merge_3 = CSPStage(c16 + c32, hidden_ratio, c32, n, act, **rep)
        self.bu_conv24 = ConvBNAct(c8, c8, 3, 2, act=act)
        self.merge_4 = CSPStage(c8 + c16 + c32, hidden_ratio, c16, n, act, **rep)
        self.merge_5 = CSPStage(c16 + c8, hidden_ratio, o8, n, act, **rep)
        self.bu_conv57 = ConvBNAct(o8, o8, 3, 2, act=act)
        self.merge_7 = CSPStage(o8 + c16, hidden_ratio, o16, n, act, **rep)
        self.bu_conv46 = ConvBNAct(c16, c16, 3, 2, act=act)
        self.bu_conv76 = ConvBNAct(o16, o16, 3, 2, act=act)
        self.merge_6 = CSPStage(c16 + o16 + c32, hidden_ratio, o32, n, act, **rep)

    def forward(
        self, feats: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x8, x16, x32 = feats[0], feats[1], feats[2]
        p32 = self.merge_3(torch.cat([x32, self.bu_conv13(x16)], 1))
        p16 = self.merge_4(torch.cat([x16, self.bu_conv24(x8), self.upsample(p32)], 1))
        out8 = self.merge_5(torch.cat([x8, self.upsample(p16)], 1))
        out16 = self.merge_7(torch.cat([p16, self.bu_conv57(out8)], 1))
        out32 = self.merge_6(torch.cat([p32, self.bu_conv46(p16), self.bu_conv76(out16)], 1))
        return out8, out16, out32
