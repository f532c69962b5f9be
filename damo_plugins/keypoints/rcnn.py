"""The whole Keypoint R-CNN R50-FPN (Detectron2's ``keypoint_rcnn_R_50_FPN_3x``) as one module
that exports to one ONNX graph of standard ops.

``image [1, 3, H, W]`` (BGR, 0..255, any size) -> backbone (ResNet-50 + FPN, P2..P6) -> RPN
(anchors per level, delta decoding, per-level top-k, clip, drop empty boxes, NMS per level,
top-k) -> box head (7 x 7 ROIAlignV2 on P2..P5, fc1/fc2, class scores and class-specific
deltas, clip, score threshold, NMS per class, top-k) -> keypoint head and post-processing
(:class:`~damo_plugins.keypoints.head.KeypointRCNNHead`). Outputs ``boxes [D, 4]``,
``scores [D]``, ``classes [D]`` and ``keypoints [D, K, 3]`` in the input image's pixels; ``D``
is dynamic and may be 0. Like Detectron2's ``GeneralizedRCNN.inference`` the image is taken
as already resized (``ResizeShortestEdge`` happens outside the model) and the boxes are in
that image's coordinates.

Semantics are Detectron2's (read from its ``rpn.py``, ``proposal_utils.py``,
``anchor_generator.py``, ``box_regression.py``, ``fast_rcnn.py`` and ``poolers.py``):

* anchors: one size per level (32..512 on P2..P6), aspect ratios 0.5/1/2 (``h/w``), cells
  centred at 0 (offset 0), shifted by ``stride * (x, y)``; location-major, anchor-minor order,
  which is the order of the RPN outputs after ``permute(0, 2, 3, 1)``;
* deltas: ``Box2BoxTransform`` with weights (1, 1, 1, 1) for the RPN and (10, 10, 5, 5) for
  the box head, ``dw, dh`` clamped at ``log(1000 / 16)``;
* RPN: top ``pre_nms_topk`` logits per level, boxes clipped to the (unpadded) image, boxes
  with width or height ``<= min_size`` dropped, NMS (IoU > 0.7 suppresses) within each level,
  the first ``post_nms_topk`` by score kept;
* box head: softmax over ``K + 1`` classes (background last), class-specific boxes clipped,
  candidates with score ``> score_thresh`` kept, NMS (IoU > 0.5) within each class, the first
  ``detections_per_image`` by score kept;
* FPN pooler: level ``floor(4 + log2(sqrt(area) / 224 + 1e-8))`` clamped to 2..5.

"NMS within each level/class" uses the coordinate-offset formulation (each group's boxes
shifted by ``group * (max(H, W) + 1)``, which cannot overlap across groups because boxes are
clipped to the image) so that one ONNX ``NonMaxSuppression`` does it. The eager model uses the
same boxes and our own greedy NMS (torchvision is not installable beside this torch), which is
the reference the exported graph is checked against.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from damo_plugins.core.errors import DamoError
from damo_plugins.keypoints.head import KeypointRCNNHead, pool_fpn_levels
from damo_plugins.keypoints.roi_align import ROIAlign

#: Box2BoxTransform's clamp on dw, dh (Detectron2: log(1000 / 16))
SCALE_CLAMP = math.log(1000.0 / 16)
RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


# ------------------------------------------------------------------------------- NMS
def nms_reference(boxes: Tensor, scores: Tensor, iou_threshold: float, max_output: int) -> Tensor:
    """Greedy NMS: indices of kept boxes by decreasing score (ties: lower index first).

    A box is suppressed by a kept one when IoU > ``iou_threshold`` (torchvision's and ONNX
    Runtime's rule); IoU is ``inter / (area_a + area_b - inter)`` with areas from corners.
    """
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes.double()
    x0 = torch.minimum(b[:, 0], b[:, 2])
    x1 = torch.maximum(b[:, 0], b[:, 2])
    y0 = torch.minimum(b[:, 1], b[:, 3])
    y1 = torch.maximum(b[:, 1], b[:, 3])
    area = (x1 - x0) * (y1 - y0)
    suppressed = torch.zeros(boxes.shape[0], dtype=torch.bool)
    keep: list[int] = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        if len(keep) >= max_output:
            break
        iw = (torch.minimum(x1[i], x1) - torch.maximum(x0[i], x0)).clamp(min=0)
        ih = (torch.minimum(y1[i], y1) - torch.maximum(y0[i], y0)).clamp(min=0)
        inter = iw * ih
        union = area[i] + area - inter
        iou = torch.where(union > 0, inter / union.clamp(min=1e-30), torch.zeros_like(inter))
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.int64)


class _NMSFunction(torch.autograd.Function):
    """Eager: :func:`nms_reference`; exported: one ONNX ``NonMaxSuppression`` (one class)."""

    @staticmethod
    def forward(ctx, boxes, scores, iou_threshold, max_output):  # type: ignore[override]
        return nms_reference(boxes, scores, iou_threshold, max_output)

    @staticmethod
    def symbolic(g, boxes, scores, iou_threshold, max_output):  # type: ignore[no-untyped-def]
        def const(value: Any, dtype: torch.dtype) -> torch.Value:
            return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))

        zero = const([0], torch.int64)
        boxes3 = g.op("Unsqueeze", boxes, zero)  # [1, N, 4]
        scores3 = g.op("Unsqueeze", scores, const([0, 1], torch.int64))  # [1, 1, N]
        selected = g.op(
            "NonMaxSuppression",
            boxes3,
            scores3,
            const([max_output], torch.int64),
            const([iou_threshold], torch.float32),
            center_point_box_i=0,
        )  # [M, 3] = (batch, class, box), by decreasing score within the class
        two, three, one = (const([v], torch.int64) for v in (2, 3, 1))
        column = g.op("Slice", selected, two, three, one)
        return g.op("Squeeze", column, one)


def batched_nms(
    boxes: Tensor, scores: Tensor, groups: Tensor, extent: Tensor, iou: float, max_output: int
) -> Tensor:
    """NMS within each group (level or class) via coordinate offsets; sorted by score.

    ``extent`` bounds every coordinate (``max(H, W)``): boxes are clipped to the image, so
    after shifting group ``g`` by ``g * (extent + 1)`` boxes of different groups never overlap.
    """
    shifted = boxes + (groups.to(boxes.dtype) * (extent + 1.0))[:, None]
    return _NMSFunction.apply(shifted, scores, float(iou), int(max_output))


# -------------------------------------------------------------------------- helpers
def topk_count(values: Tensor, k: int) -> Any:
    """``min(k, len(values))``, kept symbolic when traced (the level sizes follow H, W)."""
    if not torch.jit.is_tracing():
        return min(k, values.shape[0])
    n = torch._shape_as_tensor(values)[0:1]
    return torch.minimum(n, torch.tensor([k], dtype=n.dtype))[0]


def apply_deltas(deltas: Tensor, boxes: Tensor, weights: Sequence[float]) -> Tensor:
    """Box2BoxTransform.apply_deltas: ``deltas [R, C, 4]`` on ``boxes [R, 4]`` -> ``[R, C, 4]``."""
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = (deltas[..., 2] / ww).clamp(max=SCALE_CLAMP)
    dh = (deltas[..., 3] / wh).clamp(max=SCALE_CLAMP)
    px = dx * widths[:, None] + ctr_x[:, None]
    py = dy * heights[:, None] + ctr_y[:, None]
    pw = torch.exp(dw) * widths[:, None]
    ph = torch.exp(dh) * heights[:, None]
    return torch.stack([px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph], -1)


def clip_boxes(boxes: Tensor, hw: Tensor) -> Tensor:
    """Clamp x to ``[0, W]`` and y to ``[0, H]`` (``hw`` = float ``[H, W]``); any leading dims."""
    h, w = hw[0], hw[1]
    zero = torch.zeros_like(h)
    x0 = torch.minimum(torch.maximum(boxes[..., 0], zero), w)
    y0 = torch.minimum(torch.maximum(boxes[..., 1], zero), h)
    x1 = torch.minimum(torch.maximum(boxes[..., 2], zero), w)
    y1 = torch.minimum(torch.maximum(boxes[..., 3], zero), h)
    return torch.stack([x0, y0, x1, y1], -1)


def cell_anchors(size: float, ratios: Sequence[float]) -> Tensor:
    """``[A, 4]`` anchors centred at 0: area ``size^2``, ``h / w = ratio`` (Detectron2's order)."""
    rows = []
    for ratio in ratios:
        w = math.sqrt(size * size / ratio)
        h = ratio * w
        rows.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(rows, dtype=torch.float32)


def grid_anchors(feature: Tensor, cell: Tensor, stride: int) -> Tensor:
    """All anchors of one level, ``[H * W * A, 4]``, location-major (y, then x), anchor-minor.

    Coordinates come from ``cumsum`` of ones along the feature's axes, so H and W stay
    symbolic in the exported graph.
    """
    row = feature[0, 0, 0, :]
    col = feature[0, 0, :, 0]
    xs = (torch.ones_like(row).cumsum(0) - 1.0) * stride
    ys = (torch.ones_like(col).cumsum(0) - 1.0) * stride
    sx = xs[None, :] + 0.0 * ys[:, None]
    sy = ys[:, None] + 0.0 * xs[None, :]
    shifts = torch.stack([sx, sy, sx, sy], -1).reshape(-1, 1, 4)
    return (shifts + cell[None]).reshape(-1, 4)


def image_hw(image: Tensor) -> Tensor:
    """Float ``[H, W]`` of the (unpadded) image, symbolic when traced."""
    return torch._shape_as_tensor(image)[2:4].to(torch.float32)


# ------------------------------------------------------------------------------- RPN
class RPNHead(nn.Module):
    """StandardRPNHead: shared 3x3 conv + ReLU, 1x1 objectness (A) and deltas (4A)."""

    def __init__(self, channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.objectness_logits = nn.Conv2d(channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(channels, num_anchors * 4, 1)
        for layer in (self.conv, self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)


class RPN(nn.Module):
    """Proposals of one image from P2..P6: ``forward(features, hw) -> (boxes, logits)``."""

    def __init__(
        self,
        channels: int = 256,
        sizes: Sequence[float] = (32, 64, 128, 256, 512),
        strides: Sequence[int] = (4, 8, 16, 32, 64),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        pre_nms_topk: int = 1000,
        post_nms_topk: int = 1000,
        nms_thresh: float = 0.7,
        min_size: float = 0.0,
    ) -> None:
        super().__init__()
        if len(sizes) != len(strides):
            raise DamoError(f"RPN: {len(sizes)} anchor sizes for {len(strides)} levels")
        if pre_nms_topk < 1 or post_nms_topk < 1:
            raise DamoError("RPN: pre_nms_topk and post_nms_topk must be at least 1")
        self.strides = tuple(int(s) for s in strides)
        self.num_anchors = len(aspect_ratios)
        self.pre_nms_topk = int(pre_nms_topk)
        self.post_nms_topk = int(post_nms_topk)
        self.nms_thresh = float(nms_thresh)
        self.min_size = float(min_size)
        self.rpn_head = RPNHead(channels, self.num_anchors)
        for i, size in enumerate(sizes):
            self.register_buffer(f"cell{i}", cell_anchors(size, aspect_ratios), persistent=False)

    def forward(self, features: Sequence[Tensor], hw: Tensor) -> tuple[Tensor, Tensor]:
        if len(features) != len(self.strides):
            raise DamoError(f"RPN takes {len(self.strides)} levels, got {len(features)}")
        head = self.rpn_head
        boxes, logits, levels = [], [], []
        for i, (feat, stride) in enumerate(zip(features, self.strides)):
            t = torch.relu(head.conv(feat))
            score = head.objectness_logits(t).permute(0, 2, 3, 1).reshape(-1)
            delta = head.anchor_deltas(t).reshape(1, self.num_anchors, 4, -1)
            delta = delta.permute(0, 3, 1, 2).reshape(-1, 4)
            anchors = grid_anchors(feat, getattr(self, f"cell{i}"), stride)
            top, idx = torch.topk(score, topk_count(score, self.pre_nms_topk))
            boxes.append(apply_deltas(delta[idx][:, None, :], anchors[idx], RPN_WEIGHTS)[:, 0])
            logits.append(top)
            levels.append(torch.full_like(top, float(i)))
        box = clip_boxes(torch.cat(boxes), hw)
        logit = torch.cat(logits)
        level = torch.cat(levels)
        size_ok = ((box[:, 2] - box[:, 0]) > self.min_size) & (
            (box[:, 3] - box[:, 1]) > self.min_size
        )
        keep = torch.nonzero(size_ok)[:, 0]
        box, logit, level = box[keep], logit[keep], level[keep]
        keep = batched_nms(box, logit, level, hw.max(), self.nms_thresh, self.post_nms_topk)
        return box[keep], logit[keep]


# -------------------------------------------------------------------------- box head
class FPNPooler(nn.Module):
    """Detectron2's ``ROIPooler`` (ROIAlignV2) over P2..P5 with its level assignment."""

    def __init__(self, resolution: int, strides: Sequence[int] = (4, 8, 16, 32)) -> None:
        super().__init__()
        self.poolers = nn.ModuleList(
            ROIAlign((resolution, resolution), 1.0 / s, 0) for s in strides
        )

    def forward(self, features: Sequence[Tensor], boxes: Tensor) -> Tensor:
        return pool_fpn_levels(self.poolers, features, boxes)


class BoxHead(nn.Module):
    """``FastRCNNConvFCHead`` with two fc layers (``box_head.fc1``, ``fc2``)."""

    def __init__(self, in_features: int, fc_dim: int = 1024) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, fc_dim)
        self.fc2 = nn.Linear(fc_dim, fc_dim)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1)))))


class BoxPredictor(nn.Module):
    """``FastRCNNOutputLayers``: ``cls_score`` (K + 1, background last), ``bbox_pred`` (4K)."""

    def __init__(self, fc_dim: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(fc_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(fc_dim, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)


class ROIHeads(nn.Module):
    """Box head + keypoint head of one image (``roi_heads.*``)."""

    def __init__(
        self,
        channels: int = 256,
        num_classes: int = 1,
        fc_dim: int = 1024,
        box_resolution: int = 7,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_image: int = 100,
        keypoint_head: KeypointRCNNHead | None = None,
    ) -> None:
        super().__init__()
        if detections_per_image < 1:
            raise DamoError("detections_per_image must be at least 1")
        self.num_classes = int(num_classes)
        self.score_thresh = float(score_thresh)
        self.nms_thresh = float(nms_thresh)
        self.detections_per_image = int(detections_per_image)
        self.box_pooler = FPNPooler(box_resolution)
        self.box_head = BoxHead(channels * box_resolution * box_resolution, fc_dim)
        self.box_predictor = BoxPredictor(fc_dim, num_classes)
        self.keypoint_head = keypoint_head or KeypointRCNNHead(in_channels=channels)

    def detect(
        self, features: Sequence[Tensor], proposals: Tensor, hw: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``fast_rcnn_inference`` for one image: boxes ``[D, 4]``, scores, classes."""
        x = self.box_head(self.box_pooler(features, proposals))
        probs = torch.softmax(self.box_predictor.cls_score(x), -1)[:, : self.num_classes]
        deltas = self.box_predictor.bbox_pred(x).reshape(-1, self.num_classes, 4)
        boxes = clip_boxes(apply_deltas(deltas, proposals, BOX_WEIGHTS), hw).reshape(-1, 4)
        flat = probs.reshape(-1)
        cand = torch.nonzero(flat > self.score_thresh)[:, 0]  # row-major over [R, K]
        boxes, scores = boxes[cand], flat[cand]
        classes = cand % self.num_classes
        keep = batched_nms(
            boxes, scores, classes, hw.max(), self.nms_thresh, self.detections_per_image
        )
        return boxes[keep], scores[keep], classes[keep]


# ---------------------------------------------------------------------- whole model
class KeypointRCNN(nn.Module):
    """``image`` -> ``boxes [D, 4]``, ``scores [D]``, ``classes [D]``, ``keypoints [D, K, 3]``.

    Module names are Detectron2's (``backbone``, ``proposal_generator``, ``roi_heads``), so
    a whole checkpoint loads by name (:meth:`load_detectron2`). ``backbone`` may be any module
    giving P2..P6 with ``channels`` channels (tests use a small one); the default is
    :class:`~damo_plugins.keypoints.backbone.ResNet50FPN`.
    """

    input_names = ("image",)
    output_names = ("boxes", "scores", "classes", "keypoints")

    def __init__(
        self,
        backbone: nn.Module | None = None,
        channels: int = 256,
        num_classes: int = 1,
        num_keypoints: int = 17,
        keypoint_conv_dims: Sequence[int] = (512,) * 8,
        fc_dim: int = 1024,
        pre_nms_topk: int = 1000,
        post_nms_topk: int = 1000,
        rpn_nms_thresh: float = 0.7,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_image: int = 100,
        postprocess: str = "vectorized",
        example_size: tuple[int, int] = (128, 160),
    ) -> None:
        super().__init__()
        if backbone is None:
            from damo_plugins.keypoints.backbone import ResNet50FPN

            backbone = ResNet50FPN(channels)
        self.backbone = backbone
        self.proposal_generator = RPN(
            channels,
            pre_nms_topk=pre_nms_topk,
            post_nms_topk=post_nms_topk,
            nms_thresh=rpn_nms_thresh,
        )
        keypoint_head = KeypointRCNNHead(
            in_channels=channels,
            num_keypoints=num_keypoints,
            conv_dims=keypoint_conv_dims,
            postprocess=postprocess,
        )
        self.roi_heads = ROIHeads(
            channels,
            num_classes,
            fc_dim,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_image=detections_per_image,
            keypoint_head=keypoint_head,
        )
        self.example_size = tuple(int(v) for v in example_size)

    @property
    def postprocess(self) -> str:
        return self.roi_heads.keypoint_head.postprocess

    @postprocess.setter
    def postprocess(self, method: str) -> None:
        self.roi_heads.keypoint_head.postprocess = method

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if image.dim() != 4 or image.shape[0] != 1 or image.shape[1] != 3:
            raise DamoError(
                f"KeypointRCNN takes one BGR image [1, 3, H, W], got {list(image.shape)}"
            )
        hw = image_hw(image)
        feats = self.backbone(image)
        proposals, _ = self.proposal_generator(feats, hw)
        boxes, scores, classes = self.roi_heads.detect(feats[:4], proposals, hw)
        kp_head = self.roi_heads.keypoint_head
        keypoints = kp_head(*feats[:4], boxes)
        return boxes, scores, classes, keypoints

    # ----------------------------------------------------------- export protocol
    def example_inputs(self, num_rois: int = 0, seed: int = 0) -> tuple[Tensor]:
        """A random BGR image of ``example_size``; ``num_rois`` is ignored (shared protocol)."""
        g = torch.Generator().manual_seed(seed)
        return (torch.rand(1, 3, *self.example_size, generator=g) * 255,)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes: dict[str, dict[int, str]] = {"image": {2: "height", 3: "width"}}
        for name in self.output_names:
            axes[name] = {0: "detections"}
        return axes

    # ------------------------------------------------------------------- weights
    def load_detectron2(self, source: str | Path | Mapping[str, Any]) -> list[str]:
        """Load a whole Detectron2 checkpoint (``.pkl`` / ``.pth`` / mapping) by name;
        returns the checkpoint entries the model did not use."""
        from damo_plugins.keypoints.weights import load_into, read_checkpoint, state_dict_of

        state = state_dict_of(source) if isinstance(source, Mapping) else read_checkpoint(source)
        return load_into(self, state, "")


def build_keypoint_rcnn(weights: str | Path | None = None, **kwargs: object) -> KeypointRCNN:
    """Builder for ``keypoint-rcnn-r50-fpn`` (Detectron2's test-time defaults); random
    weights unless ``weights`` names a Detectron2 checkpoint (``.pkl`` or ``.pth``)."""
    model = KeypointRCNN(**kwargs)  # type: ignore[arg-type]
    if weights is not None:
        model.load_detectron2(weights)
    return model.eval()


build_keypoint_rcnn.default_input_shape = None  # type: ignore[attr-defined]


def random_detectron2_state(
    model: nn.Module, seed: int = 0, person_bias: float = -7.6
) -> dict[str, Any]:
    """Random weights under the model's Detectron2 names, with a trained model's *scales*.

    For tests and benchmarks without a model-zoo download: frozen BN as identity, convolutions
    and fc layers scaled by fan-in (activations stay bounded through 50 layers), small RPN
    outputs, and a box classifier whose person logit varies with the box around
    ``person_bias`` (so the score threshold keeps some proposals, not none or all). Plain
    uniform random weights instead give exploding features and degenerate proposals.
    """
    import numpy as np

    g = np.random.default_rng(seed)
    state: dict[str, Any] = {}
    for name, value in model.state_dict().items():
        shape = tuple(value.shape)
        kind = name.rsplit(".", 1)[1]
        if ".norm." in name:
            array = np.ones(shape) if kind in ("weight", "running_var") else np.zeros(shape)
        elif kind == "bias" or "rpn_head" in name:
            array = g.normal(0.0, 0.01, shape)
        else:
            fan_in = shape[0] * 4 if "score_lowres" in name else int(np.prod(shape[1:]))
            array = g.normal(0.0, np.sqrt(1.0 / fan_in), shape)
        state[name] = array.astype(np.float32)
    cls = "roi_heads.box_predictor.cls_score"
    if f"{cls}.weight" in state:
        state[f"{cls}.weight"] = g.normal(0, 1e-3, state[f"{cls}.weight"].shape).astype(np.float32)
        bias = np.zeros(state[f"{cls}.bias"].shape, np.float32)
        bias[:-1] = person_bias  # background is the last class
        state[f"{cls}.bias"] = bias
    return state


# ---------------------------------------------------------------------- verification
def run_onnx(proto: Any, backend: str) -> Any:
    """A callable ``image -> [boxes, scores, classes, keypoints]`` in ORT or OpenVINO (f32)."""
    if backend == "onnxruntime":
        from damo_plugins.core.onnx_utils import ort_session

        sess = ort_session(proto)
        name = sess.get_inputs()[0].name
        return lambda image: sess.run(None, {name: image})
    if backend in ("openvino", "openvino-default"):
        import openvino as ov

        from damo_plugins.keypoints.export import OPENVINO_F32_CONFIG

        core = ov.Core()
        config = dict(OPENVINO_F32_CONFIG) if backend == "openvino" else {}
        compiled = core.compile_model(
            core.read_model(proto.SerializeToString(), b""), "CPU", config
        )
        return lambda image: [compiled({0: image})[out] for out in compiled.outputs]
    raise DamoError(f"unknown backend '{backend}'", "onnxruntime, openvino or openvino-default")


def compare_detections(ref: Sequence[Tensor], out: Sequence[Any]) -> dict[str, float]:
    """Detection counts, worst |Δbox| (px), |Δscore| and keypoint metrics (same order)."""
    import numpy as np

    from damo_plugins.keypoints.export import compare_keypoints

    r = [t.numpy() for t in ref]
    o = [np.asarray(a) for a in out]
    m: dict[str, float] = {
        "detections": float(len(r[0])),
        "count_equal": float(len(r[0]) == len(o[0])),
    }
    if len(r[0]) != len(o[0]):
        return m
    m["max_dbox_px"] = float(np.abs(r[0] - o[0]).max(initial=0.0))
    m["max_dscore"] = float(np.abs(r[1] - o[1]).max(initial=0.0))
    m["classes_equal"] = float(np.array_equal(r[2], o[2].astype(r[2].dtype)))
    m.update(compare_keypoints(r[3], o[3]))
    return m


def verify_keypoint_rcnn(
    model: KeypointRCNN,
    proto: Any,
    images: Sequence[Tensor],
    backends: Sequence[str] = ("onnxruntime", "openvino"),
) -> dict[str, list[dict[str, float]]]:
    """Eager vs each backend on every image: ``{backend: [metrics per image]}``."""
    model.eval()
    refs = []
    with torch.no_grad():
        for image in images:
            refs.append(model(image))
    results: dict[str, list[dict[str, float]]] = {}
    for backend in backends:
        run = run_onnx(proto, backend)
        results[backend] = [
            compare_detections(ref, run(image.numpy())) for ref, image in zip(refs, images)
        ]
    return results
