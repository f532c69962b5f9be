"""Exporting keypoint models and checking them in ONNX Runtime and OpenVINO.

OpenVINO note: on CPUs with AVX-512 BF16 the CPU plugin's default ``INFERENCE_PRECISION_HINT``
is bf16, which moved keypoints of the ``loop`` post-processing by up to 370 px (its MatMuls and
everything feeding them ran in bf16). The plugin keeps the *tail* of a graph in f32 -- every
node between the outputs and the last Convolution / MatMul / FullyConnected / Interpolate /
ROIPooling -- so the ``vectorized`` post-processing (none of those ops) stays f32 under the
default. A whole head still has convolutions, RoiAlign and box arithmetic before its tail,
which bf16 would round; :data:`OPENVINO_F32_CONFIG` is what keeps those f32. The runners here
compile with it unless told to use OpenVINO's defaults.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from damo_plugins.core.errors import DamoError, first_line
from damo_plugins.core.onnx_utils import MAX_ORT_IR_VERSION
from damo_plugins.keypoints.postprocess import METHODS

OPSETS = (16, 17, 18)
#: compile setting that makes OpenVINO's CPU plugin run every node in f32 (measured: setting
#: the model's rt_info ``runtime_options/INFERENCE_PRECISION_HINT`` is not honoured in 2026.4)
OPENVINO_F32_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}
#: a keypoint whose position moved by more than this (px) counts as an argmax disagreement;
#: re-implemented coordinate math differs by ~1e-3 px, a flipped argmax by >= 0.5 px
ARGMAX_PX = 0.25


class PostprocessModule(nn.Module):
    """``heatmaps_to_keypoints`` as a module with the stable ONNX interface."""

    input_names = ("maps", "rois")
    output_names = ("keypoints",)

    def __init__(self, method: str = "vectorized", num_keypoints: int = 17, heatmap_size: int = 56):
        super().__init__()
        if method not in METHODS:
            raise DamoError(
                f"unknown post-processing method '{method}'", f"one of {sorted(METHODS)}"
            )
        self.method = method
        self.num_keypoints = num_keypoints
        self.heatmap_size = heatmap_size

    def forward(self, maps: Tensor, rois: Tensor) -> Tensor:
        return METHODS[self.method](maps, rois)

    def example_inputs(self, num_rois: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        from damo_plugins.keypoints.head import person_boxes

        g = torch.Generator().manual_seed(seed)
        s = self.heatmap_size
        maps = torch.randn(num_rois, self.num_keypoints, s, s, generator=g)
        return maps, person_boxes(num_rois, 640, g)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {"maps": {0: "R"}, "rois": {0: "R"}, "keypoints": {0: "R"}}


def check_protocol(module: Any) -> None:
    """A keypoint model must say how to feed it (our head does; a user's may add it)."""
    missing = [
        a
        for a in ("input_names", "output_names", "example_inputs", "dynamic_axes")
        if not hasattr(module, a)
    ]
    if missing:
        raise DamoError(
            f"the model lacks the keypoint export protocol: {', '.join(missing)}",
            "give it input_names, output_names, example_inputs(num_rois, seed) and "
            "dynamic_axes() (see docs/keypoints.md), or use keypoint-rcnn-head",
        )


def export_keypoint_model(
    module: nn.Module, opset: int = 17, num_rois: int = 3, seed: int = 0
) -> Any:
    """TorchScript-based export with a dynamic ROI axis; returns a checked ``ModelProto``."""
    import onnx

    if opset not in OPSETS:
        raise DamoError(f"keypoint export supports opsets {OPSETS}, got {opset}", "use --opset 17")
    check_protocol(module)
    module.eval()
    args = tuple(module.example_inputs(num_rois, seed))
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                buf,
                dynamo=False,
                opset_version=opset,
                input_names=list(module.input_names),
                output_names=list(module.output_names),
                dynamic_axes=module.dynamic_axes(),
                do_constant_folding=True,
            )
    except DamoError:
        raise
    except Exception as exc:
        first = first_line(exc)
        raise DamoError(
            f"keypoint ONNX export failed: {type(exc).__name__}: {first[:300]}"
        ) from exc
    proto = onnx.load_from_string(buf.getvalue())
    proto.ir_version = min(proto.ir_version, MAX_ORT_IR_VERSION)  # what ONNX Runtime reads
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise DamoError(
            f"exported keypoint model fails the ONNX checker: {str(exc)[:300]}"
        ) from exc
    return proto


def export_postprocess(opset: int = 17, method: str = "vectorized", num_keypoints: int = 17) -> Any:
    """The graph of ``heatmaps_to_keypoints`` alone: ``maps``, ``rois`` -> ``keypoints``."""
    proto = export_keypoint_model(PostprocessModule(method, num_keypoints), opset=opset)
    # the exporter leaves K and 4 symbolic; state the stable interface [R, K, 4] exactly
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    for dim, value in zip(list(dims)[1:], (num_keypoints, 4)):
        dim.Clear()
        dim.dim_value = value
    return proto


# --------------------------------------------------------------------------- runners
def ort_runner(
    proto: Any, threads: int | None = None
) -> Callable[[Sequence[np.ndarray]], np.ndarray]:
    from damo_plugins.core.onnx_utils import ort_session

    sess = ort_session(proto, threads=threads)
    names = [i.name for i in sess.get_inputs()]
    return lambda feeds: sess.run(None, dict(zip(names, feeds)))[0]


def openvino_runner(
    proto: Any, threads: int | None = None, f32: bool = True
) -> Callable[[Sequence[np.ndarray]], np.ndarray]:
    """Compile an ONNX model in OpenVINO (CPU) and return a callable.

    ``f32=False`` compiles with OpenVINO's own defaults, as a user's plain ``compile_model``
    would (bf16 on bf16-capable CPUs).
    """
    try:
        import openvino as ov
    except ImportError as exc:
        raise DamoError("OpenVINO is not installed", "pip install openvino") from exc
    core = ov.Core()
    config: dict[str, Any] = dict(OPENVINO_F32_CONFIG) if f32 else {}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    model = core.read_model(proto.SerializeToString(), b"")
    compiled = core.compile_model(model, "CPU", config)
    names = [p.any_name for p in compiled.inputs]
    return lambda feeds: compiled(dict(zip(names, feeds)))[compiled.output(0)]


def openvino_default_runner(
    proto: Any, threads: int | None = None
) -> Callable[[Sequence[np.ndarray]], np.ndarray]:
    """OpenVINO with no precision setting: what ``core.compile_model(path)`` gives a user."""
    return openvino_runner(proto, threads, f32=False)


RUNNERS = {
    "onnxruntime": ort_runner,
    "openvino": openvino_runner,
    "openvino-default": openvino_default_runner,
}


# ------------------------------------------------------------------------ comparison
def compare_keypoints(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Argmax agreement and worst differences; last axis (x, y, [logit,] score)."""
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(candidate, dtype=np.float64)
    if ref.shape != out.shape:
        return {"argmax_agreement": 0.0, "shape_mismatch": 1.0}
    if ref.size == 0:
        return {"argmax_agreement": 1.0, "max_dx_px": 0.0, "max_dy_px": 0.0, "max_rel_dscore": 0.0}
    dx = np.abs(ref[..., 0] - out[..., 0])
    dy = np.abs(ref[..., 1] - out[..., 1])
    same = (dx <= ARGMAX_PX) & (dy <= ARGMAX_PX)
    score_rel = np.abs(ref[..., -1] - out[..., -1]) / np.maximum(np.abs(ref[..., -1]), 1e-12)
    metrics = {
        "argmax_agreement": float(same.mean()),
        "max_dx_px": float(dx[same].max(initial=0.0)),
        "max_dy_px": float(dy[same].max(initial=0.0)),
        "max_rel_dscore": float(score_rel[same].max(initial=0.0)),
    }
    if ref.shape[-1] == 4:
        metrics["max_dlogit"] = float(np.abs(ref[..., 2] - out[..., 2])[same].max(initial=0.0))
    return metrics


def verify_keypoint_model(
    module: nn.Module,
    proto: Any,
    num_rois: Sequence[int] = (0, 1, 4, 100),
    backends: Sequence[str] = ("onnxruntime", "openvino"),
    seed: int = 0,
    image_sizes: Sequence[int] = (),
) -> dict[str, dict[str, Any]]:
    """PyTorch vs each backend for every ROI count: ``{backend: {"R=n": metrics}}``.

    With ``image_sizes`` (modules with an ``image_size`` attribute, e.g. the head) every ROI
    count is also run on inputs of each image size: keys ``"R=n@size"``.
    """
    results: dict[str, dict[str, Any]] = {}
    runners = {}
    for name in backends:
        if name not in RUNNERS:
            raise DamoError(f"unknown backend '{name}'", f"one of {sorted(RUNNERS)}")
        runners[name] = RUNNERS[name](proto)
    module.eval()
    sizes: list[int | None] = [None, *image_sizes]
    original = getattr(module, "image_size", None)
    try:
        for size in sizes:
            if size is not None:
                module.image_size = int(size)
            for r in num_rois:
                args = module.example_inputs(int(r), seed + int(r))
                with torch.no_grad():
                    ref = module(*args).numpy()
                feeds = [a.numpy() for a in args]
                key = f"R={r}" if size is None else f"R={r}@{size}"
                for name, run in runners.items():
                    results.setdefault(name, {})[key] = compare_keypoints(ref, run(feeds))
    finally:
        if original is not None:
            module.image_size = original
    return results
