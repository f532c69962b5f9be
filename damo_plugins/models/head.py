"""ZeroHead: DAMO-YOLO's GFL-style head without stacked convs, decoding inside the graph.

Per level, a 3x3 conv gives class logits (``gfl_cls``) and another the box distribution
(``gfl_reg``: 4 sides x ``reg_max + 1`` bins, times a learnable ``scales[i].scale``). At
inference the head returns sigmoid ``scores [N, A, C]`` and ``boxes [N, A, 4]`` (x1, y1, x2,
y2 in input pixels): softmax over the bins, expectation with ``integral.project`` (0..reg_max),
times the level's stride, subtracted from / added to the anchor point (top-left of the cell,
as upstream). NMS stays outside.

Decode details:

* The decode runs level by level in the convolutions' own layout (``[N, 4, bins, H*W]``):
  the softmax and the expectation run over the bins axis with the anchors innermost, and
  only the 4 distances per anchor are transposed. Flattening first (``[N, A, 4, bins]``, the
  layout training uses) gives the same numbers but a softmax over 17 innermost values and a
  transpose of the whole distribution: in OpenVINO at 256 px that was 0.18 ms + 0.06 ms of
  a 2.4 ms INT8 inference against 0.05 ms now (docs/benchmarks.md, "Deployment rewrites").
* The per-anchor stride is a ``[1, A, 4]`` constant rather than ``[1, A, 1]``: identical
  numbers, but the broadcast form made an INT8 OpenVINO IR fail to compile when the decode
  was left in float (see FACTS.md).

Anchors and export: by default the anchor grid is computed from Python ints, so a traced
export records it as constants (the smallest graph, what a fixed-size deployment wants).
While :func:`damo_plugins.lib.onnx_export.export_onnx` traces with dynamic height/width it
switches the grid to shape-dependent ops (``Shape -> Range -> ...``), so the same graph gives
the right anchors at every input size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.fx
from torch import nn

from damo_plugins.lib.onnx_export import tracing_dynamic_size


class Scale(nn.Module):
    """A learnable scalar factor (``scale``, a 0-d parameter as upstream)."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(value, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Integral(nn.Module):
    """Expectation of a distribution over ``0..reg_max`` (buffer ``project``, as upstream)."""

    def __init__(self, reg_max: int) -> None:
        super().__init__()
        self.reg_max = reg_max
        # 0, 1, ..., reg_max exactly (as linspace(0, reg_max, reg_max + 1)); from a list,
        # because linspace/arange on the meta device (architecture matching, FLOP counting)
        # import torch._dynamo and sympy: seconds in a fresh process
        bins = [float(i) for i in range(reg_max + 1)]
        self.register_buffer("project", torch.tensor(bins, dtype=torch.float32))

    def forward(self, prob: torch.Tensor) -> torch.Tensor:
        """``prob [..., bins, K]`` -> ``[..., K]``: the bins axis second to last, so that the
        anchors stay innermost (see the module docstring).

        A matrix product with the bin values as a row vector on the left: one MatMul per
        level whose constant no quantizer mistakes for a learned weight. Two alternatives
        fail in today's stack: an element-wise product with the shared bin constant made
        NNCF stop ("More than one node in NNCFGraph matches name"), and a transposed
        matrix-vector product was miscompiled by OpenVINO 2026.4 (max abs. error 4e3). FLOP
        counters (torch's, and ours for ONNX and OpenVINO) count this product:
        ``2 * 4 * bins`` per anchor."""
        return torch.matmul(self.project.to(prob.dtype)[None], prob).squeeze(-2)


def distances_to_boxes(points: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """Boxes ``x1, y1, x2, y2`` from anchor points and ``[left, top, right, bottom]``
    distances (both ``[..., 4]``, pixels): the one decode step the head, the training loss and
    the benchmarks share."""
    return torch.cat([points[..., :2] - dist[..., :2], points[..., 2:] + dist[..., 2:]], dim=-1)


def anchor_grid(
    feats: Sequence[torch.Tensor], strides: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor points ``[1, A, 4]`` (x, y, x, y) and strides ``[1, A, 4]`` for feature maps.

    Normally computed from static shapes, so that tracers (ONNX export, fx) record constants.
    Inside an export with dynamic height/width (:func:`tracing_dynamic_size`) the sizes are
    read from the tensors instead, so the tracer records shape-dependent ops and the exported
    grid follows the runtime feature-map size. Both paths give identical numbers. It is
    registered with :func:`torch.fx.wrap` so symbolic tracing keeps it as one opaque call,
    which also makes a graph-level re-parameterized model (a ``GraphModule``) decide between
    the two paths at run time, not when it was traced.
    """
    # Under torch.export / dynamo (INC's PT2E path) the context variable is not consulted:
    # reading it there splits the traced graph (INC then fails with "Input partition has more
    # than one output node"), and dynamo keeps static sizes as ints and dynamic ones symbolic
    # by itself.
    compiling = torch.compiler.is_compiling()
    dynamic = not compiling and tracing_dynamic_size()
    points, scales = [], []
    for f, s in zip(feats, strides):
        if dynamic or compiling:
            # kept as (traced) sizes: no int(), which would freeze them into the graph
            h, w = f.shape[-2], f.shape[-1]
        else:
            h, w = int(f.shape[-2]), int(f.shape[-1])
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=f.dtype, device=f.device) * s,
            torch.arange(w, dtype=f.dtype, device=f.device) * s,
            indexing="ij",
        )
        xy = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)
        level = torch.cat([xy, xy], dim=-1)
        points.append(level)
        if dynamic:
            scales.append(torch.full_like(level, float(s)))
        else:
            scales.append(torch.full((h * w, 4), float(s), dtype=f.dtype, device=f.device))
    return torch.cat(points)[None], torch.cat(scales)[None]


torch.fx.wrap("anchor_grid")


class ZeroHead(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: Sequence[int],
        reg_max: int = 16,
        strides: Sequence[int] = (8, 16, 32),
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.strides = tuple(strides)
        self.gfl_cls = nn.ModuleList(nn.Conv2d(c, num_classes, 3, padding=1) for c in in_channels)
        self.gfl_reg = nn.ModuleList(
            nn.Conv2d(c, 4 * (reg_max + 1), 3, padding=1) for c in in_channels
        )
        self.scales = nn.ModuleList(Scale(1.0) for _ in self.strides)
        self.integral = Integral(reg_max)
        # GFL initialisation: small weights, class bias at the prior probability. Skipped on
        # the meta device (architecture matching, FLOP counting): there is nothing to fill,
        # and a random init there imports torch._dynamo (~7 s in a fresh process).
        if self.gfl_cls[0].weight.is_meta:
            return
        bias = -math.log((1 - prior_prob) / prior_prob)
        for conv in [*self.gfl_cls, *self.gfl_reg]:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        for conv in self.gfl_cls:
            nn.init.constant_(conv.bias, bias)

    def forward_levels(
        self, feats: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw outputs for training and decoding.

        Returns class logits ``[N, A, C]``, box-bin logits ``[N, A, 4, reg_max + 1]``, anchor
        points ``[1, A, 4]`` and strides ``[1, A, 4]``; anchors run level by level, row-major.
        """
        cls_out, reg_out = [], []
        for i, f in enumerate(feats):
            n = f.shape[0]
            cls_out.append(self.gfl_cls[i](f).flatten(2).permute(0, 2, 1))
            reg = self.scales[i](self.gfl_reg[i](f))
            reg_out.append(reg.reshape(n, 4, self.reg_max + 1, -1).permute(0, 3, 1, 2))
        points, strides = anchor_grid(feats, self.strides)
        return torch.cat(cls_out, 1), torch.cat(reg_out, 1), points, strides

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sigmoid ``scores [N, A, C]`` and ``boxes [N, A, 4]``: the same numbers as decoding
        :meth:`forward_levels`' outputs (up to float32 summation order), computed in the
        layout that deploys fast (module docstring)."""
        logits, dists = [], []
        for i, f in enumerate(feats):
            n = f.shape[0]
            logits.append(self.gfl_cls[i](f).flatten(2))  # [N, C, HW]
            reg = self.scales[i](self.gfl_reg[i](f)).reshape(n, 4, self.reg_max + 1, -1)
            dists.append(self.integral(reg.softmax(dim=2)))  # [N, 4, HW]
        points, strides = anchor_grid(feats, self.strides)
        scores = torch.cat(logits, 2).permute(0, 2, 1).sigmoid()
        dist = torch.cat(dists, 2).permute(0, 2, 1) * strides
        return scores, distances_to_boxes(points, dist)
