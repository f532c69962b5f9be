"""ResNet-50 + FPN in Detectron2's layout (``build_resnet_fpn_backbone``), loadable by name.

This is the backbone of ``keypoint_rcnn_R_50_FPN_3x``: MSRA ResNet-50 with frozen batch norm
and the stride in the first 1x1 convolution of each stage (``STRIDE_IN_1X1 = True``), then an
FPN with 256 channels (lateral 1x1 and output 3x3 convolutions with bias, nearest x2 top-down
sum) giving P2..P5, and P6 = stride-2 subsampling of P5 (``LastLevelMaxPool``, used by the RPN
only). Module names are Detectron2's minus ``backbone.`` (``bottom_up.res2.0.conv1.norm.
running_var``, ``fpn_lateral2.weight``), so a model-zoo checkpoint loads by name.

Input: one BGR image, float ``[1, 3, H, W]`` in 0..255 (Detectron2's default format), any
size: it is normalised with Detectron2's pixel mean (std 1) and zero-padded to a multiple of
32 inside the graph, as Detectron2's ``ImageList`` does, so H and W stay dynamic in ONNX.

What is *not* here yet (issue 18, item 6): RPN, box head, NMS and the glue to the keypoint
head — the whole Keypoint R-CNN in one graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

#: Detectron2's default PIXEL_MEAN for MSRA weights (BGR); PIXEL_STD is 1
PIXEL_MEAN = (103.530, 116.280, 123.675)
#: prefix of the backbone's parameters in a Detectron2 checkpoint
BACKBONE_PREFIX = "backbone."


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine terms (Detectron2's, same buffer names)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels) - eps)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


class ConvNorm(nn.Conv2d):
    """Conv without bias followed by ``.norm`` (Detectron2's ``Conv2d(..., norm=...)``)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__(cin, cout, k, stride=stride, padding=padding, bias=False)
        self.norm = FrozenBatchNorm2d(cout)
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(super().forward(x))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int) -> None:
        super().__init__()
        self.shortcut = ConvNorm(cin, cout, 1, stride) if (cin != cout or stride != 1) else None
        self.conv1 = ConvNorm(cin, mid, 1, stride)  # STRIDE_IN_1X1
        self.conv2 = ConvNorm(mid, mid, 3, 1, 1)
        self.conv3 = ConvNorm(mid, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.conv1(x))
        y = torch.relu(self.conv2(y))
        y = self.conv3(y)
        return torch.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class Stem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = ConvNorm(3, 64, 7, 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.max_pool2d(torch.relu(self.conv1(x)), 3, 2, 1)


class ResNet50(nn.Module):
    """``bottom_up``: stem + res2..res5 (3, 4, 6, 3 bottlenecks); returns C2..C5."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = Stem()
        cin = 64
        for i, (blocks, mid, cout, stride) in enumerate(
            [(3, 64, 256, 1), (4, 128, 512, 2), (6, 256, 1024, 2), (3, 512, 2048, 2)], 2
        ):
            stage = nn.Sequential(
                *(
                    Bottleneck(cin if b == 0 else cout, mid, cout, stride if b == 0 else 1)
                    for b in range(blocks)
                )
            )
            self.add_module(f"res{i}", stage)
            cin = cout

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        out = []
        for i in range(2, 6):
            x = getattr(self, f"res{i}")(x)
            out.append(x)
        return out


class ResNet50FPN(nn.Module):
    """``backbone``: BGR image -> (P2, P3, P4, P5, P6), 256 channels, strides 4..64."""

    input_names = ("image",)
    output_names = ("p2", "p3", "p4", "p5", "p6")

    def __init__(self, out_channels: int = 256) -> None:
        super().__init__()
        self.bottom_up = ResNet50()
        for level, cin in zip(range(2, 6), (256, 512, 1024, 2048)):
            self.add_module(f"fpn_lateral{level}", nn.Conv2d(cin, out_channels, 1))
            self.add_module(f"fpn_output{level}", nn.Conv2d(out_channels, out_channels, 3, 1, 1))
        for name, p in self.named_parameters():
            if name.startswith("fpn_"):
                if name.endswith("bias"):
                    nn.init.zeros_(p)
                else:
                    nn.init.kaiming_uniform_(p, a=1)  # Detectron2's c2_xavier_fill
        self.register_buffer(
            "pixel_mean", torch.tensor(PIXEL_MEAN).reshape(1, 3, 1, 1), persistent=False
        )

    def preprocess(self, image: Tensor) -> Tensor:
        """Subtract the pixel mean, then zero-pad bottom/right to a multiple of 32."""
        x = image - self.pixel_mean
        h, w = x.shape[-2], x.shape[-1]
        pad_h = (32 - h % 32) % 32
        pad_w = (32 - w % 32) % 32
        return nn.functional.pad(x, [0, pad_w, 0, pad_h])

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        c2, c3, c4, c5 = self.bottom_up(self.preprocess(image))
        inner = self.fpn_lateral5(c5)
        outs = [self.fpn_output5(inner)]
        for level, c in zip((4, 3, 2), (c4, c3, c2)):
            top_down = nn.functional.interpolate(inner, scale_factor=2.0, mode="nearest")
            inner = getattr(self, f"fpn_lateral{level}")(c) + top_down
            outs.insert(0, getattr(self, f"fpn_output{level}")(inner))
        p6 = nn.functional.max_pool2d(outs[-1], kernel_size=1, stride=2)
        return (*outs, p6)

    # ----------------------------------------------------------- export protocol
    def example_inputs(self, num_rois: int = 0, seed: int = 0) -> tuple[Tensor]:
        """A random BGR image; ``num_rois`` is ignored (the protocol shares the signature)."""
        g = torch.Generator().manual_seed(seed)
        return (torch.rand(1, 3, 96, 128, generator=g) * 255,)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {"image": {2: "height", 3: "width"}}
        for name in self.output_names:
            axes[name] = {2: f"{name}_h", 3: f"{name}_w"}
        return axes

    def load_detectron2(self, source: str | Path | Mapping[str, Any]) -> list[str]:
        """Load ``backbone.*`` from a Detectron2 checkpoint (``.pkl`` / ``.pth`` / mapping)."""
        from damo_plugins.keypoints.weights import load_into, read_checkpoint, state_dict_of

        state = state_dict_of(source) if isinstance(source, Mapping) else read_checkpoint(source)
        return load_into(self, state, BACKBONE_PREFIX)
