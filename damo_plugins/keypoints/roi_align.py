"""ROIAlign (Detectron2's ``ROIAlignV2``: ``aligned=True``) without torchvision.

torchvision cannot be installed beside the CPU torch wheel here, so this is our own PyTorch
version of the ONNX ``RoiAlign`` reference semantics with ``coordinate_transformation_mode=
"half_pixel"`` (opset >= 16), which is what ``aligned=True`` means: boxes are scaled, shifted
by -0.5 pixel and not clamped to a minimum size; ``sampling_ratio = 0`` takes
``ceil(bin size)`` samples per bin (adaptive). When exported, the module becomes one
``RoiAlign`` node (the eager code below only defines the numbers); at opset < 16 RoiAlign has
no ``half_pixel`` and would silently be misaligned, so export refuses it.

Empty boxes: with adaptive sampling a box of zero or negative width or height has no
sampling points, and torchvision (and ONNX Runtime) return zeros for it; OpenVINO's
``RoiAlign`` returns NaN (measured, 2026.4). Detectron2 clips boxes to the image without
dropping empty ones, so such boxes reach the layer: :class:`ROIAlign` therefore puts a
``Where`` after the node that returns zeros for them, in every runtime.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from damo_plugins.core.errors import DamoError


def roi_align_reference(
    features: Tensor,
    rois: Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int = 0,
) -> Tensor:
    """Average-mode aligned ROIAlign; ``rois`` is ``[R, 5]`` = (batch index, x0, y0, x1, y1)."""
    _, c, h, w = features.shape
    out_h, out_w = output_size
    result = features.new_zeros((rois.shape[0], c, out_h, out_w))
    for i in range(rois.shape[0]):
        b = int(rois[i, 0])
        x0, y0, x1, y1 = (float(v) * spatial_scale - 0.5 for v in rois[i, 1:])
        bin_h, bin_w = (y1 - y0) / out_h, (x1 - x0) / out_w
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil((y1 - y0) / out_h)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil((x1 - x0) / out_w)
        grid_h, grid_w = max(grid_h, 0), max(grid_w, 0)
        count = max(grid_h * grid_w, 1)
        if grid_h == 0 or grid_w == 0:
            continue
        ys = y0 + (
            torch.arange(out_h)[:, None] * bin_h + (torch.arange(grid_h) + 0.5) * bin_h / grid_h
        )
        xs = x0 + (
            torch.arange(out_w)[:, None] * bin_w + (torch.arange(grid_w) + 0.5) * bin_w / grid_w
        )
        wy, iy = _linear_taps(ys.reshape(-1).double(), h)  # [out_h * grid_h, 2]
        wx, ix = _linear_taps(xs.reshape(-1).double(), w)
        fmap = features[b].double()  # [C, H, W]
        vals = fmap[:, iy[:, :, None, None], ix[None, None, :, :]]  # [C, Ny, 2, Nx, 2]
        vals = (vals * wy[:, :, None, None] * wx[None, None, :, :]).sum((2, 4))  # [C, Ny, Nx]
        vals = vals.reshape(c, out_h, grid_h, out_w, grid_w).sum((2, 4)) / count
        result[i] = vals.to(features.dtype)
    return result


def _linear_taps(pos: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Bilinear weights and indices of sample positions (ONNX/Caffe2 border rules)."""
    outside = (pos < -1.0) | (pos > size)
    p = pos.clamp(min=0.0)
    low = p.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    p = torch.where(at_edge, low.double(), p)
    frac = p - low.double()
    weights = torch.stack([1.0 - frac, frac], 1)
    weights = torch.where(outside[:, None], torch.zeros_like(weights), weights)
    return weights, torch.stack([low, high], 1)


@contextlib.contextmanager
def _not_traced() -> Iterator[None]:
    """Run the block without recording it into an active TorchScript trace."""
    state = torch._C._get_tracing_state()
    if state is None:
        yield
        return
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


class _RoiAlignFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, rois, out_h, out_w, spatial_scale, sampling_ratio):  # type: ignore[override]
        # While the ONNX exporter traces, the value is needed but the reference's per-ROI ops
        # are not (``symbolic`` replaces them with one RoiAlign): recording them made the
        # R50-FPN export's trace ~5x slower (hundreds of proposals x ~30 ops each).
        with _not_traced():
            return roi_align_reference(
                features, rois, (out_h, out_w), spatial_scale, sampling_ratio
            )

    @staticmethod
    def symbolic(g, features, rois, out_h, out_w, spatial_scale, sampling_ratio):  # type: ignore[no-untyped-def]
        if getattr(g, "opset", 16) < 16:
            raise DamoError(
                "ROIAlign(aligned=True) needs ONNX opset >= 16 (half_pixel RoiAlign)",
                "export with --opset 16 or newer",
            )

        def const(values: list[int]) -> torch.Value:
            return g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))

        one = const([1])
        index = g.op("Slice", rois, const([0]), one, one)
        index = g.op("Cast", g.op("Squeeze", index, one), to_i=7)  # int64
        boxes = g.op("Slice", rois, one, const([5]), one)
        return g.op(
            "RoiAlign",
            features,
            boxes,
            index,
            coordinate_transformation_mode_s="half_pixel",
            mode_s="avg",
            output_height_i=out_h,
            output_width_i=out_w,
            sampling_ratio_i=sampling_ratio,
            spatial_scale_f=spatial_scale,
        )


class ROIAlign(nn.Module):
    """``ROIAlignV2``: ``forward(features [N,C,H,W], rois [R,5]) -> [R, C, out_h, out_w]``."""

    def __init__(self, output_size: tuple[int, int], spatial_scale: float, sampling_ratio: int = 0):
        super().__init__()
        self.output_size = (int(output_size[0]), int(output_size[1]))
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)

    def forward(self, features: Tensor, rois: Tensor) -> Tensor:
        if rois.dim() != 2 or rois.shape[1] != 5:
            raise DamoError(
                f"ROIAlign takes rois [R, 5] (batch index, x0, y0, x1, y1), got {list(rois.shape)}"
            )
        rois = rois.to(features.dtype)
        pooled = _RoiAlignFunction.apply(
            features, rois, *self.output_size, self.spatial_scale, self.sampling_ratio
        )
        if self.sampling_ratio > 0:
            return pooled  # fixed sampling samples even inverted boxes, as torchvision does
        nonempty = (rois[:, 3] > rois[:, 1]) & (rois[:, 4] > rois[:, 2])
        return torch.where(nonempty[:, None, None, None], pooled, torch.zeros_like(pooled))
