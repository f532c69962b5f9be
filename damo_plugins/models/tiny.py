"""``tiny-cnn``: a few-kilobyte convolutional net for smoke tests and quick demos.

It has the pieces the passes care about (Conv+BN, a RepVGG-style two-branch block, a
residual add, two outputs) and builds in milliseconds.
"""

from __future__ import annotations

import torch
from torch import nn


class _ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
            nn.BatchNorm2d(cout),
        )


class TinyCNN(nn.Module):
    input_names = ["images"]
    output_names = ["logits", "features"]
    default_input_shape = [1, 3, 64, 64]

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.stem = _ConvBN(3, width, 3, 2)
        self.branch3 = _ConvBN(width, width, 3)
        self.branch1 = _ConvBN(width, width, 1)
        self.block = _ConvBN(width, width, 3)
        self.head = nn.Linear(width, num_classes)
        self.act = nn.ReLU()
        # Non-trivial BN statistics, so that folding bugs cannot hide behind identity BNs.
        g = torch.Generator().manual_seed(0)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.act(self.stem(x))
        x = self.act(self.branch3(x) + self.branch1(x))
        f = self.act(self.block(x) + x)
        logits = self.head(f.mean(dim=(2, 3)))
        return logits, f


def build_tiny_cnn(num_classes: int = 10, width: int = 8) -> TinyCNN:
    """A tiny two-output CNN (64x64 input) for smoke tests."""
    return TinyCNN(num_classes=num_classes, width=width)


build_tiny_cnn.default_input_shape = [1, 3, 64, 64]  # type: ignore[attr-defined]
