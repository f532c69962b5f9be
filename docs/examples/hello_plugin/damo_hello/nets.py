"""The PyTorch half of the example plugin, imported only when a model is built or wrapped.

``damo-opt --help`` and ``damo-opt plugins`` load every installed plugin (and importing
``damo_hello.eager`` imports ``damo_hello`` first); keeping torch out of
``damo_hello/__init__.py`` keeps those commands fast for everyone who has this plugin.
"""

from __future__ import annotations

import torch
from torch import nn


class Scaled(nn.Module):
    """``inner`` with every output multiplied by ``scale`` (what the ``hello`` pass makes)."""

    def __init__(self, inner: nn.Module, scale: float) -> None:
        super().__init__()
        self.inner = inner
        self.scale = scale

    def forward(self, *args: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out = self.inner(*args)
        if isinstance(out, torch.Tensor):
            return out * self.scale
        return tuple(o * self.scale for o in out)


class HelloNet(nn.Module):
    """A conv + BN + classifier small enough to build in milliseconds (``hello-net``)."""

    #: names the artifact gives the input and output tensors (and ONNX export keeps)
    input_names = ["images"]
    output_names = ["logits"]

    def __init__(self, *, channels: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )
        self.head = nn.Linear(channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images).mean(dim=(2, 3)))
