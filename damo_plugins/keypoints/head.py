"""A Keypoint R-CNN head in Detectron2's layout, exportable end to end with a dynamic R.

``KRCNNConvDeconvUpsampleHead``: 8 x (conv3x3, 512, ReLU), ConvTranspose 4x4 stride 2 to K
channels, x2 bilinear upsampling -> 56 x 56 logits; fed by ROIAlignV2 (14 x 14, adaptive
sampling) on FPN levels P2..P5 with Detectron2's level assignment (canonical box 224 at
level 4), and followed by :func:`heatmaps_to_keypoints`. Output ``[R, K, 3]`` = (x, y, score),
what ``keypoint_rcnn_inference`` keeps. One image per call (batch index 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from damo_plugins.core.errors import DamoError
from damo_plugins.keypoints.postprocess import METHODS
from damo_plugins.keypoints.roi_align import ROIAlign


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
        postprocess: str = "loop",
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
        layers: list[nn.Module] = []
        channels = in_channels
        for dim in conv_dims:
            layers += [nn.Conv2d(channels, dim, 3, padding=1), nn.ReLU()]
            channels = dim
        self.convs = nn.Sequential(*layers)
        self.score_lowres = nn.ConvTranspose2d(channels, num_keypoints, 4, stride=2, padding=1)
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            else:
                nn.init.kaiming_normal_(param, mode="fan_out", nonlinearity="relu")

    def pool(self, features: Sequence[Tensor], boxes: Tensor) -> Tensor:
        """Detectron2's ROIPooler: each box pooled from level floor(4 + log2(sqrt(area)/224))."""
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0)
        level = torch.floor(4 + torch.log2(area.sqrt() / 224 + 1e-8)).clamp(2, 5) - 2
        rois = torch.cat([torch.zeros_like(boxes[:, :1]), boxes], 1)
        pooled = None
        for i, (pooler, feat) in enumerate(zip(self.poolers, features)):
            part = pooler(feat, rois) * (level == i).to(feat.dtype)[:, None, None, None]
            pooled = part if pooled is None else pooled + part
        return pooled

    def heatmaps(self, features: Sequence[Tensor], boxes: Tensor) -> Tensor:
        x = self.score_lowres(self.convs(self.pool(features, boxes)))
        return nn.functional.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)

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
        return {"boxes": {0: "R"}, "keypoints": {0: "R"}}


def person_boxes(num: int, image_size: float, generator: torch.Generator) -> Tensor:
    """Random upright boxes shaped like people (height 15–90 % of the image, aspect 0.3–0.6)."""
    h = (torch.rand(num, generator=generator) * 0.75 + 0.15) * image_size
    w = h * (torch.rand(num, generator=generator) * 0.3 + 0.3)
    x0 = torch.rand(num, generator=generator) * (image_size - w)
    y0 = torch.rand(num, generator=generator) * (image_size - h)
    return torch.stack([x0, y0, x0 + w, y0 + h], 1)


def build_keypoint_rcnn_head(**kwargs: object) -> KeypointRCNNHead:
    """Builder for ``keypoint-rcnn-head`` (Detectron2 defaults; random weights)."""
    return KeypointRCNNHead(**kwargs)  # type: ignore[arg-type]


build_keypoint_rcnn_head.default_input_shape = None  # type: ignore[attr-defined]
