"""INT8 Keypoint R-CNN: the exported whole-model graph quantized with NNCF in OpenVINO.

What may be INT8 is read from the graph, not from a list of node names. Ops downstream of a
data-dependent selection (``TopK``, ``NonMaxSuppression``, ``NonZero``, ``ROIAlign``) are the
*sparse* part: decoding of the selected proposals, NMS, the pooled box and keypoint heads and
the keypoint post-processing. The *features* are every ancestor of a ``ROIAlign``'s data input:
the backbone and the FPN.

Only the convolutions computing the features are quantized (NNCF on the backbone sub-graph,
its quantizers then copied into the whole graph); box arithmetic, the RPN head, ROIAlign,
TopK/NMS, the box and keypoint heads and the heatmap post-processing stay float -- the issue's
"backbone and FPN quantized, heads and post-processing in float". (The keypoint head runs D
times on 14 x 14 x 512 maps and at D ~ 100 costs more than the backbone; quantizing it is not
offered yet: it needs the pooled features as calibration data of a head sub-graph.)

Everything else is in NNCF's ``IgnoredScope``, whatever its position: NNCF's CPU
configuration would otherwise put FakeQuantize on elementwise ``Add``/``Multiply`` inputs,
which in this graph include box coordinates and anchor grids (quantizing them moves boxes by
pixels).

The NNCF import is local: this module is domain code (layer 2), and ``nncf`` is a third-party
library, not one of our adapters (which the domain may not import).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from damo_plugins.core.errors import DamoError, first_line

#: ops whose output depends on which boxes were selected: everything downstream is "sparse"
SELECTION_OPS = frozenset({"TopK", "NonMaxSuppression", "NonZero", "ROIAlign"})
#: ops NNCF turns into INT8 arithmetic (weights and activations quantized)
MATRIX_OPS = frozenset(
    {"Convolution", "GroupConvolution", "ConvolutionBackpropData", "MatMul"}
)
#: ops that are neither computed nor quantized
STRUCTURAL = frozenset({"Parameter", "Constant", "Result"})
#: a detection of the INT8 model matches an FP32 one with the same class and IoU >= this
MATCH_IOU = 0.5
#: Detectron2's test-time resize (``ResizeShortestEdge``): short side, cap on the long side
SHORT_EDGE = 800
MAX_SIZE = 1333


# ------------------------------------------------------------------------- scope
def _weights_are_constant(op: Any) -> bool:
    """A learned layer: its second input is a constant (possibly through a Convert)."""
    if op.get_input_size() < 2:
        return False
    src = op.input_value(1).get_node()
    while src.get_type_name() in ("Convert", "Reshape", "Transpose") and src.get_input_size():
        src = src.input_value(0).get_node()
    return src.get_type_name() == "Constant"


def sparse_ops(model: Any) -> set[str]:
    """Friendly names of every op downstream of a selection op (the selections included)."""
    todo = [op for op in model.get_ordered_ops() if op.get_type_name() in SELECTION_OPS]
    seen: set[str] = set()
    while todo:
        op = todo.pop()
        name = op.get_friendly_name()
        if name in seen:
            continue
        seen.add(name)
        for out in op.outputs():
            todo.extend(t.get_node() for t in out.get_target_inputs())
    return seen


def feature_ops(model: Any) -> set[str]:
    """Friendly names of the ops computing the features ROIAlign pools (backbone + FPN):
    every ancestor of a ``ROIAlign``'s data input (input 0, not the boxes)."""
    todo = [
        op.input_value(0).get_node()
        for op in model.get_ordered_ops()
        if op.get_type_name() == "ROIAlign"
    ]
    seen: set[str] = set()
    while todo:
        op = todo.pop()
        name = op.get_friendly_name()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(port.get_source_output().get_node() for port in op.inputs())
    return seen


def quantization_scope(model: Any) -> tuple[list[str], list[str]]:
    """``(quantized, kept_float)``: friendly names of the learned matrix ops computing the
    pooled features (backbone + FPN), and of every other computing op of ``model``.

    The RPN head stays float although it is not downstream of a selection: its objectness
    logits only *rank* anchors, and INT8 rounding of a narrow logit range turns the ranking
    into ties that ``TopK`` breaks by position (measured on the small test model with the
    RPN head quantized: the INT8 proposals moved to the image's top rows).
    """
    sparse = sparse_ops(model)
    features = feature_ops(model)
    if not sparse or not features:
        raise DamoError(
            "this graph has no TopK / NonMaxSuppression / RoiAlign: it is not a whole "
            "Keypoint R-CNN, so its backbone cannot be told from its heads",
            "export it with `damo-opt keypoints export --full`",
        )
    dense_features = features - sparse
    quantized, kept = [], []
    for op in model.get_ordered_ops():
        kind, name = op.get_type_name(), op.get_friendly_name()
        if kind in STRUCTURAL:
            continue
        if kind in MATRIX_OPS and _weights_are_constant(op) and name in dense_features:
            quantized.append(name)
        else:
            kept.append(name)
    return quantized, kept


def to_openvino(model: Any) -> Any:
    """A fresh ``openvino.Model`` from an ONNX ``ModelProto``, a path, or a model (cloned)."""
    import openvino as ov

    if isinstance(model, ov.Model):
        return model.clone()
    if isinstance(model, (str, Path)):
        return ov.Core().read_model(str(model))
    return ov.Core().read_model(model.SerializeToString(), b"")


def backbone_model(model: Any) -> Any:
    """The sub-graph computing the pooled features, as its own ``openvino.Model``:
    image -> the data inputs of every ``ROIAlign`` (P2..P5). ``model`` must be a clone
    the caller owns: the sub-model shares its nodes."""
    import openvino as ov

    outs, seen = [], set()
    for op in model.get_ordered_ops():
        if op.get_type_name() != "ROIAlign":
            continue
        src = op.input_value(0)
        key = (src.get_node().get_friendly_name(), src.get_index())
        if key not in seen:
            seen.add(key)
            outs.append(src)
    return ov.Model([ov.opset13.result(o) for o in outs], list(model.get_parameters()), "features")


# the ops NNCF adds around a quantized convolution (activation FakeQuantize; weights as
# FakeQuantize, or int8 constants with Convert / Subtract / Multiply)
_NEW_OPS = ("FakeQuantize", "Convert", "Multiply", "Subtract", "Constant")


def transplant_quantizers(quantized: Any, target: Any) -> int:
    """Copy what NNCF inserted into ``quantized`` (a sub-graph of ``target``, same friendly
    names) into ``target``: for every original op whose input NNCF rewired, the new nodes
    feeding it are rebuilt in ``target`` and connected the same way. Returns the number of
    inputs rewired. Any op NNCF added that is not in ``_NEW_OPS`` is an error.
    """
    import openvino as ov

    ops = ov.opset13
    original = {op.get_friendly_name(): op for op in target.get_ordered_ops()}
    built: dict[str, Any] = {}

    def rebuild(out: Any) -> Any:
        node = out.get_node()
        name = node.get_friendly_name()
        if name in original:
            return original[name].output(out.get_index())
        if name in built:
            return built[name].output(out.get_index())
        kind = node.get_type_name()
        if kind not in _NEW_OPS:
            raise DamoError(f"NNCF added an unexpected {kind} node ({name}) to the backbone")
        args = [rebuild(port.get_source_output()) for port in node.inputs()]
        if kind == "Constant":
            new = ops.constant(node.get_data().copy())
        elif kind == "FakeQuantize":
            new = ops.fake_quantize(*args, levels=node.get_attributes()["levels"])
        elif kind == "Convert":
            new = ops.convert(args[0], node.get_output_element_type(0))
        elif kind == "Multiply":
            new = ops.multiply(*args)
        else:
            new = ops.subtract(*args)
        new = new.output(0).get_node() if hasattr(new, "output") else new
        new.set_friendly_name(name)
        built[name] = new
        return new.output(out.get_index())

    rewired = 0
    for op in quantized.get_ordered_ops():
        name = op.get_friendly_name()
        if name not in original or op.get_type_name() in STRUCTURAL:
            continue
        for i, port in enumerate(op.inputs()):
            src = port.get_source_output().get_node()
            if src.get_friendly_name() in original:
                continue
            original[name].input(i).replace_source_output(rebuild(port.get_source_output()))
            rewired += 1
    target.validate_nodes_and_infer_types()
    return rewired


def quantize_keypoint_rcnn(
    model: Any,
    calibration: Sequence[np.ndarray],
    *,
    preset: Literal["performance", "mixed"] = "mixed",
    subset_size: int = 300,
) -> tuple[Any, dict[str, Any]]:
    """NNCF post-training INT8 of a whole Keypoint R-CNN graph; ``(openvino.Model, info)``.

    ``calibration``: BGR images ``[1, 3, H, W]`` (any size each, as the graph takes them).
    NNCF quantizes the backbone sub-graph alone (:func:`backbone_model`): given the whole
    graph it spent minutes matching its hardware patterns against ~1,700 ops (RPN, NMS,
    loops of the post-processing) that stay float anyway, and its graph builder rejects the
    post-processing's Loop bodies (they read outer constants). The quantizers are then copied
    into the whole graph (:func:`transplant_quantizers`). ``preset`` ``mixed`` (asymmetric
    activations): the stem sees a mean-subtracted image, not centred on zero. Bias correction
    is off (the biases of a Detectron2 checkpoint are kept as trained). A result without any
    FakeQuantize is an error: it would be an FP32 model under an INT8 name.
    """
    try:
        import nncf
    except ImportError as exc:
        raise DamoError("NNCF is not installed", "pip install nncf") from exc
    import logging

    items = list(calibration)
    if not items:
        raise DamoError("the calibration set is empty", "give a folder with a few images")
    for i, item in enumerate(items):
        if np.ndim(item) != 4 or np.shape(item)[:2] != (1, 3):
            raise DamoError(
                f"calibration item {i} has shape {list(np.shape(item))}, not one BGR image "
                "[1, 3, H, W]",
                "give image files, or a .npy of shape [N, 3, H, W]",
            )
    full = to_openvino(model)
    quantized, kept = quantization_scope(full)
    sub = backbone_model(full.clone())  # clone: same friendly names, nodes not shared
    log = logging.getLogger("nncf")
    level = log.level
    log.setLevel(logging.WARNING)  # NNCF logs every skipped quantizer at INFO
    try:
        result = nncf.quantize(
            sub,
            nncf.Dataset(items, lambda x: [np.asarray(x, dtype=np.float32)]),
            preset=nncf.QuantizationPreset(preset),
            subset_size=min(int(subset_size), len(items)),
            ignored_scope=nncf.IgnoredScope(names=kept, validate=False),
            advanced_parameters=nncf.AdvancedQuantizationParameters(disable_bias_correction=True),
        )
    except DamoError:
        raise
    except Exception as exc:
        raise DamoError(
            f"NNCF could not quantize the Keypoint R-CNN backbone: {type(exc).__name__}: "
            f"{first_line(exc)[:300]}"
        ) from exc
    finally:
        log.setLevel(level)
    rewired = transplant_quantizers(result, full)
    fq = fake_quantize_targets(full)
    stray = sorted(set(fq) - set(quantized))
    if stray:
        raise DamoError(f"NNCF quantized ops outside the backbone: {', '.join(stray[:5])}")
    if not fq:
        raise DamoError(
            "NNCF placed no quantizer in the Keypoint R-CNN: the result would be FP32",
            "check the calibration images",
        )
    info = {
        "scope": "backbone",
        "preset": preset,
        "calibration_images": len(items),
        "backbone_layers": len(quantized),
        "quantized_layers": len(fq),
        "fake_quantize": sum(1 for op in full.get_ordered_ops()
                             if op.get_type_name() == "FakeQuantize"),
        "inputs_rewired": rewired,
        "kept_float_ops": len(kept),
    }
    return full, info


def fake_quantize_targets(model: Any) -> dict[str, list[str]]:
    """``{op quantized: [its FakeQuantize names]}`` -- where INT8 really is in ``model``.

    A FakeQuantize feeds its op directly or through a Convert/Reshape/Transpose (weights).
    """
    out: dict[str, list[str]] = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() != "FakeQuantize":
            continue
        todo = [t.get_node() for t in op.output(0).get_target_inputs()]
        while todo:
            node = todo.pop()
            if node.get_type_name() in ("Convert", "Reshape", "Transpose", "Multiply"):
                todo.extend(t.get_node() for t in node.output(0).get_target_inputs())
                continue
            out.setdefault(node.get_friendly_name(), []).append(op.get_friendly_name())
    return out


# -------------------------------------------------------------------- fidelity
def match_detections(
    ref_boxes: np.ndarray,
    ref_classes: np.ndarray,
    boxes: np.ndarray,
    classes: np.ndarray,
    iou: float = MATCH_IOU,
) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching in the reference's order (by decreasing score):
    ``(ref index, candidate index, IoU)`` for pairs of the same class with IoU >= ``iou``."""
    from damo_plugins.lib.boxes import box_iou

    if len(ref_boxes) == 0 or len(boxes) == 0:
        return []
    ious = np.asarray(box_iou(np.asarray(ref_boxes, np.float64), np.asarray(boxes, np.float64)))
    same = np.asarray(ref_classes).reshape(-1, 1) == np.asarray(classes).reshape(1, -1)
    ious = np.where(same, ious, -1.0)
    used = np.zeros(len(boxes), bool)
    pairs = []
    for r in range(len(ref_boxes)):
        row = np.where(used, -1.0, ious[r])
        c = int(row.argmax())
        if row[c] >= iou:
            used[c] = True
            pairs.append((r, c, float(row[c])))
    return pairs


def int8_fidelity(
    reference: Iterable[Sequence[np.ndarray]], candidate: Iterable[Sequence[np.ndarray]]
) -> dict[str, float]:
    """How closely the INT8 model reproduces the FP32 one, over images.

    Each item is one image's ``[boxes, scores, classes, keypoints]``. Detections are matched
    one-to-one (same class, IoU >= 0.5, greedy by FP32 score): ``recall`` = matched / FP32
    detections, ``precision`` = matched / INT8 detections, ``mean_iou`` of the matches and
    ``max_dscore``; keypoints of matched detections: displacement sqrt(dx^2 + dy^2) in pixels
    (median, 95th percentile, max) and ``kp_within_2px`` (share moved by at most 2 px);
    ``unmatched_max_score``: the best score of a detection only one model makes (close to
    the score threshold, such detections are the threshold flipping, not a lost object).
    No detection anywhere counts as perfect agreement (1.0), not as a division by zero.
    """
    n_ref = n_out = 0
    ious: list[float] = []
    dscore: list[float] = []
    disp: list[np.ndarray] = []
    unmatched: list[float] = []
    images = 0
    for ref, out in zip(reference, candidate):
        images += 1
        rb, rs, rc, rk = (np.asarray(a) for a in ref)
        ob, os_, oc, ok = (np.asarray(a) for a in out)
        n_ref += len(rb)
        n_out += len(ob)
        pairs = match_detections(rb, rc, ob, oc)
        ref_hit, out_hit = {p[0] for p in pairs}, {p[1] for p in pairs}
        unmatched += [float(v) for i, v in enumerate(rs) if i not in ref_hit]
        unmatched += [float(v) for i, v in enumerate(os_) if i not in out_hit]
        for r, c, v in pairs:
            ious.append(v)
            dscore.append(abs(float(rs[r]) - float(os_[c])))
            disp.append(np.hypot(rk[r, :, 0] - ok[c, :, 0], rk[r, :, 1] - ok[c, :, 1]))
    d = np.concatenate(disp) if disp else np.zeros(0)
    matched = len(ious)
    return {
        "images": float(images),
        "fp32_detections": float(n_ref),
        "int8_detections": float(n_out),
        "matched": float(matched),
        "recall": matched / n_ref if n_ref else 1.0,
        "precision": matched / n_out if n_out else 1.0,
        "mean_iou": float(np.mean(ious)) if ious else 1.0,
        "max_dscore": float(max(dscore, default=0.0)),
        "unmatched_max_score": float(max(unmatched, default=0.0)),
        "kp_median_px": float(np.median(d)) if d.size else 0.0,
        "kp_p95_px": float(np.percentile(d, 95)) if d.size else 0.0,
        "kp_max_px": float(d.max(initial=0.0)),
        "kp_within_2px": float((d <= 2.0).mean()) if d.size else 1.0,
    }


def openvino_f32(model: Any, threads: int | None = None) -> Callable[[np.ndarray], list[Any]]:
    """Compile ``model`` (ONNX proto, path or ``openvino.Model``) on CPU with the f32 hint
    and return ``image -> [boxes, scores, classes, keypoints]``.

    The hint keeps the float part of an INT8 model f32 (bf16 would round the boxes); the
    FakeQuantize'd convolutions still run in INT8.
    """
    import openvino as ov

    from damo_plugins.keypoints.export import OPENVINO_F32_CONFIG

    config: dict[str, Any] = dict(OPENVINO_F32_CONFIG)
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    compiled = ov.Core().compile_model(to_openvino(model), "CPU", config)
    outs = list(compiled.outputs)
    return lambda image: [np.asarray(compiled({0: image})[o]) for o in outs]


def compare_int8_model(
    fp32: Any, int8: Any, images: Sequence[np.ndarray], threads: int | None = None
) -> dict[str, float]:
    """:func:`int8_fidelity` of two graphs, both in OpenVINO with the f32 hint."""
    run_ref, run_q = openvino_f32(fp32, threads), openvino_f32(int8, threads)
    return int8_fidelity([run_ref(x) for x in images], [run_q(x) for x in images])


# ------------------------------------------------------------------------ images
def read_bgr_images(
    source: str | Path, limit: int | None = None, short_edge: int = SHORT_EDGE,
    max_size: int = MAX_SIZE,
) -> list[np.ndarray]:
    """Images as the whole model takes them: BGR float32 ``[1, 3, H, W]`` in 0..255, resized
    like Detectron2's ``ResizeShortestEdge`` (short side ``short_edge``, long side at most
    ``max_size``, bilinear), no padding. ``source`` is an image file, a folder of images, or a
    ``.npy`` of shape ``[N, 3, H, W]`` / ``[1, 3, H, W]`` already in that form."""
    from PIL import Image, UnidentifiedImageError

    from damo_plugins.data.calibration import IMAGE_SUFFIXES

    root = Path(source)
    if not root.exists():
        raise DamoError(f"image source not found: {root}", "give a folder of images or a .npy")
    if root.suffix.lower() == ".npy":
        arr = np.load(root, allow_pickle=False)
        if arr.ndim != 4 or arr.shape[1] != 3:
            raise DamoError(f"{root}: shape {list(arr.shape)}, expected [N, 3, H, W] BGR")
        return [np.ascontiguousarray(a[None], dtype=np.float32) for a in arr[:limit]]
    files = (
        [root]
        if root.is_file()
        else sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    )
    if not files:
        raise DamoError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    out = []
    for f in files[:limit]:
        try:
            with Image.open(f) as im:
                rgb = im.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DamoError(f"cannot decode image {f}: {exc}", "remove or replace it") from exc
        scale = short_edge / min(rgb.width, rgb.height)
        if max(rgb.width, rgb.height) * scale > max_size:
            scale = max_size / max(rgb.width, rgb.height)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        arr = np.asarray(rgb.resize(size, Image.BILINEAR), dtype=np.float32)[..., ::-1]
        out.append(np.ascontiguousarray(arr.transpose(2, 0, 1)[None]))
    return out


# ------------------------------------------------------------------------- export
#: what ``damo-opt keypoints export --int8`` requires of the INT8 model on held-out images
#: (FP32 detections found again, no extra ones, keypoints of matched detections)
MIN_RECALL = 0.9
MIN_PRECISION = 0.9
MAX_KP_P95_PX = 2.0


def fidelity_failures(m: dict[str, float]) -> list[str]:
    """Which of the ``--int8`` fidelity bounds ``m`` (from :func:`int8_fidelity`) misses."""
    bad = []
    if m["recall"] < MIN_RECALL:
        bad.append(f"recall {m['recall']:.3f} < {MIN_RECALL}")
    if m["precision"] < MIN_PRECISION:
        bad.append(f"precision {m['precision']:.3f} < {MIN_PRECISION}")
    if m["kp_p95_px"] > MAX_KP_P95_PX:
        bad.append(f"keypoint p95 displacement {m['kp_p95_px']:.2f} px > {MAX_KP_P95_PX}")
    return bad


def split_holdout(images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``(calibration, held out)``: the last quarter (at least one image) is kept out of
    calibration so that fidelity is measured on images the quantizer never saw."""
    if len(images) < 2:
        raise DamoError(
            f"--int8 needs at least 2 images ({len(images)} given): one or more are held out "
            "of calibration to measure fidelity",
            "give a folder with a few dozen representative images",
        )
    held = max(1, len(images) // 4)
    return list(images[:-held]), list(images[-held:])


def export_int8(
    proto: Any, images: Sequence[np.ndarray], output: str | Path
) -> tuple[dict[str, Any], dict[str, float]]:
    """Quantize the exported FP32 graph on ``images`` minus the held-out ones, write the
    OpenVINO IR (``output`` .xml and its .bin) and measure fidelity on the held-out images.
    Returns ``(quantization info, fidelity)``; the info counts quantized ops the way
    :func:`damo_plugins.lib.fidelity.quantized_ops` does."""
    import os
    import tempfile

    import openvino as ov

    from damo_plugins.core.artifact import ModelArtifact
    from damo_plugins.lib.fidelity import quantized_ops

    target = Path(output)
    if target.suffix.lower() != ".xml":
        raise DamoError(f"the INT8 model is an OpenVINO IR: -o must end in .xml, got {target}")
    calib, held = split_holdout(images)
    model, info = quantize_keypoint_rcnn(proto, calib)
    info.update(quantized_ops(ModelArtifact("openvino", model)))
    info["held_out_images"] = len(held)
    fidelity = compare_int8_model(proto, model, held)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        xml = Path(tmp) / target.name
        ov.save_model(model, str(xml), compress_to_fp16=False)
        os.replace(xml.with_suffix(".bin"), target.with_suffix(".bin"))
        os.replace(xml, target)
    return info, fidelity
