"""A Keypoint R-CNN head in Detectron2's layout, exportable end to end with a dynamic R.

``KRCNNConvDeconvUpsampleHead``: 8 x (conv3x3, 512, ReLU), ConvTranspose 4x4 stride 2 to K
channels, x2 bilinear upsampling -> 56 x 56 logits; fed by ROIAlignV2 (14 x 14, adaptive
sampling) on FPN levels P2..P5 with Detectron2's level assignment (canonical box 224 at
level 4), and followed by :func:`heatmaps_to_keypoints`. Output ``[R, K, 3]`` = (x, y, score),
what ``keypoint_rcnn_inference`` keeps. One image per call (batch index 0).

Parameter names are Detectron2's (``conv_fcn1`` .. ``conv_fcnN``, ``score_lowres``), so a
Detectron2 checkpoint's ``roi_heads.keypoint_head.*`` entries load by name
(:meth:`KeypointRCNNHead.load_detectron2`). The FPN inputs have dynamic height and width.
The x2 upsampling is written as slices and weighted sums rather than ``Resize``: same numbers,
and OpenVINO's CPU plugin then keeps the deconvolution, the upsampling and the
post-processing in f32 under its bf16 default (its "graph tail" rule stops at the last
convolution, MatMul or Interpolate).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from damo_plugins.core.errors import DamoError
from damo_plugins.keypoints.postprocess import METHODS
from damo_plugins.keypoints.roi_align import ROIAlign


def pool_fpn_levels(
    poolers: Sequence[nn.Module], features: Sequence[Tensor], boxes: Tensor
) -> Tensor:
    """Detectron2's ROIPooler: each box pooled from level floor(4 + log2(sqrt(area)/224)).

    Shared by the keypoint head and the box head of :mod:`~damo_plugins.keypoints.rcnn`.
    Levels are combined with ``where``, not by multiplying with 0/1 masks: a NaN from one
    level (OpenVINO's RoiAlign on an empty box) must not leak into the chosen one.
    """
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0)
    level = torch.floor(4 + torch.log2(area.sqrt() / 224 + 1e-8)).clamp(2, 5) - 2
    rois = torch.cat([torch.zeros_like(boxes[:, :1]), boxes], 1)
    if not torch.jit.is_tracing():
        return pool_assigned_levels(poolers, features, rois, level)
    pooled = None
    for i, (pooler, feat) in enumerate(zip(poolers, features)):
        part = pooler(feat, rois)
        pooled = (
            part if pooled is None else torch.where((level == i)[:, None, None, None], part, pooled)
        )
    return pooled


def pool_assigned_levels(
    poolers: Sequence[nn.Module], features: Sequence[Tensor], rois: Tensor, level: Tensor
) -> Tensor:
    """Eager pooling of each ROI on its own level only (the exported graph pools every ROI
    on every level and selects with ``Where``: same numbers, but in eager PyTorch a large box
    sampled on P2 costs hundreds of MB and seconds, and 1000 proposals took minutes)."""
    out = None
    for i, (pooler, feat) in enumerate(zip(poolers, features)):
        idx = torch.nonzero(level == i)[:, 0]
        part = pooler(feat, rois[idx])
        if out is None:
            out = part.new_zeros((rois.shape[0], *part.shape[1:]))
        out[idx] = part
    return out


class KeypointRCNNHead(nn.Module):
    """Pooler + keypoint head + post-processing; ``forward(p2, p3, p4, p5, boxes)``."""

    input_names = ("p2", "p3", "p4", "p5", "boxes")
    output_names = ("keypoints",)

    def __init__(
        self,
        in_channels: int = 256,
        num_keypoints: int = 17,
        conv_dims: Sequence[int] = (512,) * 8,
        image_size: int = 256,
        pooler_resolution: int = 14,
        postprocess: str = "vectorized",
    ) -> None:
        super().__init__()
        if postprocess not in METHODS:
            raise DamoError(f"unknown post-processing '{postprocess}'", f"one of {sorted(METHODS)}")
        self.in_channels = in_channels
        self.num_keypoints = num_keypoints
        self.image_size = image_size
        self.postprocess = postprocess
        self.strides = (4, 8, 16, 32)
        self.poolers = nn.ModuleList(
            ROIAlign((pooler_resolution, pooler_resolution), 1.0 / s, 0) for s in self.strides
        )
        channels = in_channels
        self.num_convs = len(conv_dims)
        for i, dim in enumerate(conv_dims, 1):
            self.add_module(f"conv_fcn{i}", nn.Conv2d(channels, dim, 3, padding=1))
            channels = dim
        self.score_lowres = nn.ConvTranspose2d(channels, num_keypoints, 4, stride=2, padding=1)
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            else:
                nn.init.kaiming_normal_(param, mode="fan_out", nonlinearity="relu")

    def pool(self, features: Sequence[Tensor], boxes: Tensor) -> Tensor:
        """Detectron2's ROIPooler over P2..P5 (:func:`pool_fpn_levels`)."""
        return pool_fpn_levels(self.poolers, features, boxes)

    def heatmaps(self, features: Sequence[Tensor], boxes: Tensor) -> Tensor:
        x = self.pool(features, boxes)
        for i in range(1, self.num_convs + 1):
            x = torch.relu(getattr(self, f"conv_fcn{i}")(x))
        return upsample2x_bilinear(self.score_lowres(x))

    def forward(self, p2: Tensor, p3: Tensor, p4: Tensor, p5: Tensor, boxes: Tensor) -> Tensor:
        maps = self.heatmaps((p2, p3, p4, p5), boxes)
        kp = METHODS[self.postprocess](maps, boxes)
        return torch.cat([kp[:, :, 0:2], kp[:, :, 3:4]], 2)

    # ----------------------------------------------------------- export protocol
    def example_inputs(self, num_rois: int, seed: int = 0) -> tuple[Tensor, ...]:
        """FPN features of one ``image_size`` image and ``num_rois`` person-like boxes."""
        g = torch.Generator().manual_seed(seed)
        feats = tuple(
            torch.randn(
                1, self.in_channels, self.image_size // s, self.image_size // s, generator=g
            )
            for s in self.strides
        )
        return (*feats, person_boxes(num_rois, self.image_size, g))

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes: dict[str, dict[int, str]] = {"boxes": {0: "R"}, "keypoints": {0: "R"}}
        for name in self.input_names[:4]:
            axes[name] = {2: f"{name}_h", 3: f"{name}_w"}
        return axes

    # ------------------------------------------------------------------- weights
    def load_detectron2(self, source: str | Path | Mapping[str, Any]) -> list[str]:
        """Load ``roi_heads.keypoint_head.*`` from a Detectron2 checkpoint (file or mapping).

        ``.pkl`` files are read with a numpy-only unpickler and ``.pth`` with
        ``torch.load(weights_only=True)``; returns the unused names under the prefix.
        """
        from damo_plugins.keypoints.weights import (
            KEYPOINT_HEAD_PREFIX,
            load_into,
            read_checkpoint,
            state_dict_of,
        )

        state = state_dict_of(source) if isinstance(source, Mapping) else read_checkpoint(source)
        return load_into(self, state, KEYPOINT_HEAD_PREFIX)


def upsample2x_bilinear(x: Tensor) -> Tensor:
    """``F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)`` as slices.

    Output ``2i`` is ``0.25 * in[i-1] + 0.75 * in[i]`` and ``2i+1`` is ``0.75 * in[i] +
    0.25 * in[i+1]`` along each axis, edges repeated: the same weights PyTorch uses.
    """

    def along(t: Tensor, dim: int) -> Tensor:
        n = t.shape[dim]
        prev = torch.cat([t.narrow(dim, 0, 1), t.narrow(dim, 0, n - 1)], dim)
        nxt = torch.cat([t.narrow(dim, 1, n - 1), t.narrow(dim, n - 1, 1)], dim)
        even = 0.25 * prev + 0.75 * t
        odd = 0.75 * t + 0.25 * nxt
        shape = list(t.shape)
        shape[dim] = 2 * n
        return torch.stack([even, odd], dim + 1).reshape(shape)

    return along(along(x, 3), 2)


def person_boxes(num: int, image_size: float, generator: torch.Generator) -> Tensor:
    """Random upright boxes shaped like people (height 15–90 % of the image, aspect 0.3–0.6)."""
    h = (torch.rand(num, generator=generator) * 0.75 + 0.15) * image_size
    w = h * (torch.rand(num, generator=generator) * 0.3 + 0.3)
    x0 = torch.rand(num, generator=generator) * (image_size - w)
    y0 = torch.rand(num, generator=generator) * (image_size - h)
    return torch.stack([x0, y0, x0 + w, y0 + h], 1)


def build_keypoint_rcnn_head(
    weights: str | Path | None = None, **kwargs: object
) -> KeypointRCNNHead:
    """Builder for ``keypoint-rcnn-head`` (Detectron2 defaults); random weights unless
    ``weights`` names a Detectron2 checkpoint (``.pkl`` or ``.pth``)."""
    head = KeypointRCNNHead(**kwargs)  # type: ignore[arg-type]
    if weights is not None:
        head.load_detectron2(weights)
    return head


build_keypoint_rcnn_head.default_input_shape = None  # type: ignore[attr-defined]
