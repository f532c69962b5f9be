"""A small DAMO-YOLO-shaped detector for the adapter tests.

It has what matters to quantization: a conv backbone at strides 8/16/32, per-level head
convs, and the GFL decode DAMO-YOLO runs in-graph — sigmoid class scores ``[N, A, C]``,
softmax over ``reg_max + 1`` distance bins, the integral (a linear with the bin values),
the multiply by each anchor's stride and distance -> ``x1y1x2y2`` boxes ``[N, A, 4]``.
The decode is written like upstream DAMO-YOLO (gather the four distances, subtract from
the anchor centres, stack), so exports contain the same Gather/Sub/Unsqueeze/Concat ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU())


class ToyDamoDetector(nn.Module):
    """Few convs + a GFL decode head; outputs ``scores`` [N, A, C] and ``boxes`` [N, A, 4]."""

    input_names = ["images"]
    output_names = ["scores", "boxes"]
    strides = (8, 16, 32)

    def __init__(
        self,
        num_classes: int = 4,
        width: int = 16,
        reg_max: int = 16,
        seed: int = 0,
        cls_bias: float = -2.0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.reg_max = reg_max
        self.stem = nn.Sequential(
            _conv(3, width, 2), _conv(width, width, 2), _conv(width, width, 2)
        )
        self.down4 = _conv(width, width, 2)
        self.down5 = _conv(width, width, 2)
        self.head_stem = nn.ModuleList(_conv(width, width, 1) for _ in self.strides)
        self.cls = nn.ModuleList(nn.Conv2d(width, num_classes, 1) for _ in self.strides)
        self.reg = nn.ModuleList(nn.Conv2d(width, 4 * (reg_max + 1), 1) for _ in self.strides)
        for conv in self.cls:
            # -2: a few detections above DAMO's 0.05 score threshold; very negative: none.
            nn.init.constant_(conv.bias, cls_bias)
        self.register_buffer("project", torch.linspace(0, reg_max, reg_max + 1), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p3 = self.stem(x / 255.0)
        p4 = self.down4(p3)
        p5 = self.down5(p4)
        cls_out, reg_out = [], []
        for i, feat in enumerate((p3, p4, p5)):
            f = self.head_stem[i](feat)
            cls_out.append(self.cls[i](f).flatten(2))
            reg_out.append(self.reg[i](f).flatten(2))
        pri = self.priors_for((p3, p4, p5))  # [1, A, 3]: cx, cy, stride
        scores = torch.cat(cls_out, 2).permute(0, 2, 1).sigmoid()
        reg = torch.cat(reg_out, 2).permute(0, 2, 1)
        n, a = reg.shape[:2]
        dist = F.softmax(reg.reshape(n, a, 4, self.reg_max + 1), dim=-1)
        dist = F.linear(dist, self.project).reshape(n, a, 4)
        dist = dist * pri[..., 2, None]
        x1 = pri[..., 0] - dist[..., 0]
        y1 = pri[..., 1] - dist[..., 1]
        x2 = pri[..., 0] + dist[..., 2]
        y2 = pri[..., 1] + dist[..., 3]
        boxes = torch.stack([x1, y1, x2, y2], -1)
        return scores, boxes

    def priors_for(self, feats: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Anchor centres and strides, computed from the feature map shapes (as upstream)."""
        priors = []
        for feat, stride in zip(feats, self.strides):
            h, w = feat.shape[2:]
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            centres = torch.stack([xs.flatten(), ys.flatten()], -1).float() * stride
            priors.append(torch.cat([centres, torch.full((h * w, 1), float(stride))], -1))
        return torch.cat(priors, 0)[None]


def toy_artifact(size: int = 128, **kwargs: float):
    """The toy detector as a PyTorch artifact with its output names."""
    from damo_plugins.core.artifact import TensorSpec, load_model

    art = load_model(ToyDamoDetector(**kwargs), input_shape=[1, 3, size, size])
    art.outputs = [TensorSpec("scores", []), TensorSpec("boxes", [])]
    return art


def toy_onnx(size: int = 128, **kwargs: float):
    """The toy detector exported to ONNX (TorchScript exporter, opset 17), as an artifact."""
    from damo_plugins.core.artifact import onnx_artifact
    from damo_plugins.lib.onnx_export import export_onnx

    return onnx_artifact(export_onnx(toy_artifact(size, **kwargs)))


class UpstreamStyleDetector(ToyDamoDetector):
    """Like the toy, but with anchor priors as a constant buffer (as a static export folds them).

    The stride multiply then broadcasts a ``[1, A, 1]`` constant — the form that made an INT8
    OpenVINO IR of upstream DAMO-YOLO fail to compile with the decode left in float.
    """

    def __init__(self, size: int = 128, **kwargs: int) -> None:
        super().__init__(**kwargs)
        pri = []
        for s in self.strides:
            h = w = size // s
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            c = torch.stack([xs.flatten(), ys.flatten()], -1).float() * s
            pri.append(torch.cat([c, torch.full((h * w, 1), float(s))], -1))
        self.register_buffer("priors", torch.cat(pri, 0)[None], persistent=False)

    def priors_for(self, feats: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.priors
