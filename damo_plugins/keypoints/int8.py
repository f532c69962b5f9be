"""INT8 Keypoint R-CNN: the exported whole-model graph quantized with NNCF -- its OpenVINO
backend for an IR (:func:`quantize_keypoint_rcnn`), its ONNX backend for a QDQ graph that ONNX
Runtime runs (:func:`quantize_onnx_keypoint_rcnn`) -- and its fidelity to the FP32 graph:
detections (:func:`int8_fidelity`) and FPN feature maps (:func:`feature_fidelity`, cosine and
SNR per level, meaningful even with random weights).

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

from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from damo_plugins.core.errors import DamoError, first_line

#: ops whose output depends on which boxes were selected: everything downstream is "sparse"
SELECTION_OPS = frozenset({"TopK", "NonMaxSuppression", "NonZero", "ROIAlign"})
#: ops NNCF turns into INT8 arithmetic (weights and activations quantized)
MATRIX_OPS = frozenset({"Convolution", "GroupConvolution", "ConvolutionBackpropData", "MatMul"})
#: ops that are neither computed nor quantized
STRUCTURAL = frozenset({"Parameter", "Constant", "Result"})
#: NNCF's ``overflow_fix``: ``enable`` quantizes every convolution's weights to 7 bits
#: (-63..63). Why: a CPU without VNNI (AVX2 only, as here) multiplies u8 activations by
#: s8 weights with ``vpmaddubsw``, which sums pairs into int16 and saturates once
#: 2 * 255 * |w| > 32767, i.e. for |w| > 64. Measured with OpenVINO 2026.4 on this AVX2
#: machine: FakeQuantize -> Convolution with 8-bit weights was off by 0.39 on outputs of
#: magnitude 1.3, with 7-bit weights by 5e-4. NNCF's default (``first_layer_only``) leaves
#: 8-bit weights in every later layer. The fix costs one bit of weight precision on VNNI /
#: AMX CPUs, where it is not needed; pass ``first_layer_only`` for a model that will only
#: run there.
OverflowFix = Literal["enable", "first_layer_only", "disable"]
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


def _advanced(nncf: Any, overflow_fix: str) -> Any:
    """The NNCF advanced parameters both backends use: no bias correction, the overflow fix."""
    try:
        fix = nncf.OverflowFix(overflow_fix)
    except ValueError as exc:
        raise DamoError(
            f"unknown overflow_fix {overflow_fix!r}", "use enable, first_layer_only or disable"
        ) from exc
    return nncf.AdvancedQuantizationParameters(disable_bias_correction=True, overflow_fix=fix)


def _check_calibration(calibration: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The calibration images as a list, each one BGR image ``[1, 3, H, W]``."""
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
    return items


def quantize_keypoint_rcnn(
    model: Any,
    calibration: Sequence[np.ndarray],
    *,
    preset: Literal["performance", "mixed"] = "mixed",
    subset_size: int = 300,
    overflow_fix: OverflowFix = "enable",
) -> tuple[Any, dict[str, Any]]:
    """NNCF post-training INT8 of a whole Keypoint R-CNN graph; ``(openvino.Model, info)``.

    ``calibration``: BGR images ``[1, 3, H, W]`` (any size each, as the graph takes them).
    NNCF quantizes the backbone sub-graph alone (:func:`backbone_model`): given the whole
    graph it spent minutes matching its hardware patterns against ~1,700 ops (RPN, NMS,
    loops of the post-processing) that stay float anyway, and its graph builder rejects the
    post-processing's Loop bodies (they read outer constants). The quantizers are then copied
    into the whole graph (:func:`transplant_quantizers`). ``preset`` ``mixed`` (asymmetric
    activations): the stem sees a mean-subtracted image, not centred on zero. Bias correction
    is off (the biases of a Detectron2 checkpoint are kept as trained). ``overflow_fix``: see
    :data:`OverflowFix` (default 7-bit weights everywhere). A result without any
    FakeQuantize is an error: it would be an FP32 model under an INT8 name.
    """
    try:
        import nncf
    except ImportError as exc:
        raise DamoError("NNCF is not installed", "pip install nncf") from exc

    advanced = _advanced(nncf, overflow_fix)  # a bad option fails before any work
    items = _check_calibration(calibration)
    full = to_openvino(model)
    quantized, kept = quantization_scope(full)
    sub = backbone_model(full.clone())  # clone: same friendly names, nodes not shared
    result = _quantize_backbone(
        nncf, sub, nncf.Dataset(items, lambda x: [np.asarray(x, dtype=np.float32)]),
        preset, min(int(subset_size), len(items)), kept, advanced, "NNCF",
    )  # fmt: skip
    rewired = transplant_quantizers(result, full)
    fq = fake_quantize_targets(full)
    _check_placement(fq, quantized, "ops")
    info = {
        "scope": "backbone",
        "preset": preset,
        "overflow_fix": overflow_fix,
        "calibration_images": len(items),
        "backbone_layers": len(quantized),
        "quantized_layers": len(fq),
        "fake_quantize": sum(
            1 for op in full.get_ordered_ops() if op.get_type_name() == "FakeQuantize"
        ),
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


# ------------------------------------------------------------ ONNX (ONNX Runtime)
#: the ONNX spelling of :data:`SELECTION_OPS`
ONNX_SELECTION_OPS = frozenset({"TopK", "NonMaxSuppression", "NonZero", "RoiAlign"})
#: what ONNX Runtime's CPU provider runs in integer arithmetic (after its QDQ fusions)
ORT_INTEGER_OPS = frozenset({"QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger"})


def onnx_feature_nodes(proto: Any) -> tuple[list[int], list[str]]:
    """``(node indices, feature tensors)`` of an exported whole model: the top-level nodes
    computing what ``RoiAlign`` pools (every ancestor of a ``RoiAlign``'s data input: backbone
    and FPN), in graph order, and those tensors (P2..P5) in first-use order."""
    graph = proto.graph
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    features = list(dict.fromkeys(n.input[0] for n in graph.node if n.op_type == "RoiAlign"))
    if not features:
        raise DamoError(
            "this ONNX graph has no RoiAlign: it is not a whole Keypoint R-CNN",
            "export it with `damo-opt keypoints export --full`",
        )
    seen: set[int] = set()
    todo = [producer[t] for t in features if t in producer]
    while todo:
        i = todo.pop()
        if i in seen:
            continue
        seen.add(i)
        node = graph.node[i]
        if any(a.g.node or a.graphs for a in node.attribute):
            # a Loop/If body may read outer tensors without naming them as inputs
            raise DamoError(f"the features are computed by a control-flow node ({node.name})")
        todo.extend(producer[t] for t in node.input if t in producer)
    return sorted(seen), features


def onnx_feature_model(proto: Any) -> Any:
    """The sub-graph computing the pooled features as its own ONNX model: image -> the data
    inputs of every ``RoiAlign`` (P2..P5), same node and tensor names as ``proto``. The
    calibration model of :func:`quantize_onnx_keypoint_rcnn`, and how the FPN maps of an
    FP32 / INT8 graph are read in ONNX Runtime without running the heads."""
    import onnx

    idx, features = onnx_feature_nodes(proto)
    graph = proto.graph
    nodes = [graph.node[i] for i in idx]
    used = {t for n in nodes for t in n.input}
    sub = onnx.helper.make_graph(
        nodes,
        "features",
        [i for i in graph.input if i.name in used],
        [onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in features],
        [t for t in graph.initializer if t.name in used],
    )
    model = onnx.helper.make_model(sub, opset_imports=list(proto.opset_import))
    model.ir_version = proto.ir_version
    return model


def _constant_value(graph: Any, tensor: str) -> np.ndarray | None:
    """The value of ``tensor`` if it is an initializer, possibly behind ``Identity`` nodes
    (how the torch exporter shares one initializer between uses), else ``None``."""
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    while tensor not in inits:
        node = producer.get(tensor)
        if node is None or node.op_type != "Identity":
            return None
        tensor = node.input[0]
    return numpy_helper.to_array(inits[tensor])


def fold_frozen_batchnorm(proto: Any, keep: frozenset[str] = frozenset()) -> tuple[Any, int]:
    """``(model, folded)``: every ``Conv -> Mul(scale) -> Add(shift)`` whose scale and shift
    are per-channel constants (Detectron2's ``FrozenBatchNorm2d`` as exported) becomes one
    ``Conv`` with weight ``W * scale`` and bias ``b * scale + shift``, named like the Conv and
    writing the Add's output tensor. Tensors in ``keep`` (read outside ``proto``) are never
    folded away.

    Why: ONNX Runtime turns ``DequantizeLinear -> Conv -> [Relu] -> QuantizeLinear`` into an
    integer ``QLinearConv``, but not when a Mul and an Add sit between the Conv and the next
    quantizer; without the fold every quantized convolution would run in float on
    dequantized tensors. OpenVINO folds these itself. Per-output-channel symmetric weight
    quantization is unchanged by a per-channel scale, so this is the same INT8 model.
    """
    import onnx
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    outputs = {o.name for o in graph.output} | set(keep)
    weights = {t.name: t for t in graph.initializer}

    def only_consumer(tensor: str, op: str) -> Any:
        users = consumers.get(tensor, [])
        if tensor in outputs or len(users) != 1 or users[0].op_type != op:
            return None
        return users[0]

    def per_channel(node: Any, data: str, channels: int) -> np.ndarray | None:
        other = [t for t in node.input if t != data]
        if len(other) != 1:
            return None
        value = _constant_value(graph, other[0])
        if value is None or value.size != channels or value.ndim not in (3, 4):
            return None
        return value.reshape(channels).astype(np.float64)

    dropped: set[str] = set()  # outputs of the folded Muls (each Mul's Add reads one)
    for conv in graph.node:
        if conv.op_type != "Conv" or len(conv.input) < 2 or conv.input[1] not in weights:
            continue
        w = numpy_helper.to_array(weights[conv.input[1]])
        mul = only_consumer(conv.output[0], "Mul")
        add = only_consumer(mul.output[0], "Add") if mul is not None else None
        if add is None:
            continue
        scale = per_channel(mul, conv.output[0], w.shape[0])
        shift = per_channel(add, mul.output[0], w.shape[0])
        if scale is None or shift is None:
            continue
        bias = (
            numpy_helper.to_array(weights[conv.input[2]]).astype(np.float64)
            if len(conv.input) > 2 and conv.input[2]
            else np.zeros(w.shape[0])
        )
        new_w = (w.astype(np.float64) * scale.reshape(-1, 1, 1, 1)).astype(w.dtype)
        new_b = (bias * scale + shift).astype(w.dtype)
        names = [f"{conv.name}.weight_bn_folded", f"{conv.name}.bias_bn_folded"]
        graph.initializer.extend(
            [numpy_helper.from_array(new_w, names[0]), numpy_helper.from_array(new_b, names[1])]
        )
        data = conv.input[0]
        del conv.input[:]
        conv.input.extend([data, *names])
        dropped.add(mul.output[0])
        conv.output[0] = add.output[0]
    kept = [
        n
        for n in graph.node
        if not (n.op_type == "Mul" and n.output[0] in dropped)
        and not (n.op_type == "Add" and set(n.input) & dropped)
    ]
    del graph.node[:]
    graph.node.extend(kept)
    used = _referenced(graph)  # the unfolded weights, unless something else reads them
    inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    folded = len(dropped)
    return out, folded


def _onnx_conv_scope(proto: Any) -> tuple[list[str], list[str]]:
    """``(quantized, kept float)`` node names of a feature model: learned ``Conv`` nodes (the
    weight an initializer) are quantized, every other node is NNCF-ignored -- the ONNX
    counterpart of :func:`quantization_scope`."""
    constants = {t.name for t in proto.graph.initializer}
    quantized, kept = [], []
    for node in proto.graph.node:
        learned = node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in constants
        (quantized if learned else kept).append(node.name)
    return quantized, kept


def qdq_convs(proto: Any) -> list[str]:
    """Names of the ``Conv`` nodes of ``proto`` whose data and weight inputs both come from a
    ``DequantizeLinear`` -- the convolutions a QDQ graph marks as INT8."""
    producer = {out: n for n in proto.graph.node for out in n.output}

    def dq(tensor: str) -> bool:
        node = producer.get(tensor)
        return node is not None and node.op_type == "DequantizeLinear"

    return [
        n.name
        for n in proto.graph.node
        if n.op_type == "Conv" and len(n.input) > 1 and dq(n.input[0]) and dq(n.input[1])
    ]


def splice_quantized_features(proto: Any, quantized: Any) -> Any:
    """``proto`` with its feature nodes replaced by those of ``quantized`` (NNCF's result on
    :func:`onnx_feature_model`). The feature nodes depend on the image alone, so putting them
    first keeps the graph topologically sorted; the rest of ``proto`` is unchanged and reads
    the same feature tensors (NNCF keeps the producers' output names)."""
    import onnx

    idx, _ = onnx_feature_nodes(proto)
    drop = set(idx)
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    rest = [n for i, n in enumerate(proto.graph.node) if i not in drop]
    del graph.node[:]
    graph.node.extend(list(quantized.graph.node) + rest)
    replaced = {t.name for t in quantized.graph.initializer}
    inits = [t for t in proto.graph.initializer if t.name not in replaced]
    inits += list(quantized.graph.initializer)
    used = _referenced(graph)  # weights a fold or NNCF replaced are left out
    del graph.initializer[:]
    graph.initializer.extend(t for t in inits if t.name in used)
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    available |= {o for n in graph.node for o in n.output}
    missing = sorted({t for n in rest for t in n.input if t} - available)
    if missing:
        raise DamoError(f"the quantized backbone no longer produces {', '.join(missing[:3])}")
    return out


def _read_outside_features(proto: Any) -> frozenset[str]:
    """Tensors the nodes after the features read (heads, post-processing, their sub-graphs)."""
    idx = set(onnx_feature_nodes(proto)[0])
    names: set[str] = {o.name for o in proto.graph.output}
    for i, node in enumerate(proto.graph.node):
        if i not in idx:
            names.update(node.input)
            for attr in node.attribute:
                for body in [attr.g, *attr.graphs] if (attr.g.node or attr.graphs) else []:
                    names |= _referenced(body)
    return frozenset(names)


def _referenced(graph: Any) -> set[str]:
    """Every tensor name a node of ``graph`` or of its sub-graphs (Loop/If bodies, which may
    read outer initializers without declaring them) takes as input."""
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for body in [attr.g, *attr.graphs] if (attr.g.node or attr.graphs) else []:
                names |= _referenced(body)
    return names


def quantize_onnx_keypoint_rcnn(
    proto: Any,
    calibration: Sequence[np.ndarray],
    *,
    preset: Literal["performance", "mixed"] = "mixed",
    subset_size: int = 300,
    overflow_fix: OverflowFix = "enable",
) -> tuple[Any, dict[str, Any]]:
    """NNCF post-training INT8 of a whole Keypoint R-CNN ONNX graph for ONNX Runtime;
    ``(ModelProto with QuantizeLinear/DequantizeLinear, info)``.

    The same recipe as :func:`quantize_keypoint_rcnn` with NNCF's ONNX backend instead of
    its OpenVINO one (an OpenVINO IR cannot be run by ONNX Runtime): only the learned
    convolutions computing the pooled features are quantized, calibrated on the feature
    sub-graph alone (:func:`onnx_feature_model`) after folding the frozen batch norms into
    the convolutions (:func:`fold_frozen_batchnorm`, so that ONNX Runtime can fuse them into
    integer convolutions), preset ``mixed``, no bias correction; the result replaces the
    feature nodes of the whole graph
    (:func:`splice_quantized_features`). A result in which no convolution is fed by
    ``DequantizeLinear`` is an error.
    """
    try:
        import nncf
    except ImportError as exc:
        raise DamoError("NNCF is not installed", "pip install nncf") from exc

    advanced = _advanced(nncf, overflow_fix)  # a bad option fails before any work
    items = _check_calibration(calibration)
    sub, folded = fold_frozen_batchnorm(onnx_feature_model(proto), _read_outside_features(proto))
    quantized, kept = _onnx_conv_scope(sub)
    name = sub.graph.input[0].name
    result = _quantize_backbone(
        nncf, sub, nncf.Dataset(items, lambda x: {name: np.asarray(x, dtype=np.float32)}),
        preset, min(int(subset_size), len(items)), kept, advanced, "NNCF (ONNX)",
    )  # fmt: skip
    full = splice_quantized_features(proto, result)
    convs = qdq_convs(full)
    _check_placement(convs, quantized, "convolutions")
    info = {
        "scope": "backbone",
        "preset": preset,
        "overflow_fix": overflow_fix,
        "calibration_images": len(items),
        "backbone_layers": len(quantized),
        "quantized_layers": len(convs),
        "batchnorms_folded": folded,
        "quantize_linear": sum(n.op_type == "QuantizeLinear" for n in full.graph.node),
        "kept_float_ops": len(full.graph.node) - len(sub.graph.node) + len(kept),
    }
    return full, info


def ort_executed_ops(proto: Any, threads: int | None = None) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime actually executes (its CPU provider, all graph
    optimizations: QDQ fusion, constant folding, layout transforms), read from the
    optimized model ORT writes. ``QLinearConv`` there is an INT8 convolution; a ``Conv``
    left behind a ``DequantizeLinear`` runs in float on dequantized tensors."""
    import tempfile

    import onnx
    import onnxruntime as ort

    from damo_plugins.core.onnx_utils import ort_loadable

    proto = ort_loadable(proto)
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(opts.optimized_model_filepath)
    counts: dict[str, int] = {}
    for node in optimized.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


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


def openvino_f32(
    model: Any, threads: int | None = None, static: bool = False
) -> Callable[[np.ndarray], list[Any]]:
    """Compile ``model`` (ONNX proto, path or ``openvino.Model``) on CPU with the f32 hint
    and return ``image -> [boxes, scores, classes, keypoints]``.

    The hint keeps the float part of an INT8 model f32 (bf16 would round the boxes); the
    FakeQuantize'd convolutions still run in INT8. ``static``: see :func:`_openvino_runner`
    (needed for INT8 models with OpenVINO 2026.4).
    """
    return _openvino_runner(to_openvino(model), threads, static)


def _openvino_runner(
    model: Any, threads: int | None, static: bool
) -> Callable[[np.ndarray], list[Any]]:
    """``image -> outputs`` of ``model`` (an ``openvino.Model`` the caller hands over) on CPU
    with the f32 hint.

    ``static=True`` compiles one copy per input shape with that shape fixed
    (``model.reshape``). Why: OpenVINO 2026.4.1's CPU plugin, with a dynamic spatial shape,
    computes wrong values (zeros) for an INT8 convolution whose FakeQuantize'd input is also
    read by another op (a Result, a float Conv, an Add, a RoiAlign) -- measured on this AVX2
    machine with a 2-convolution graph, and on the small test model, whose FPN levels 3-5
    came out zero. In an FPN every level is such a tensor. With the shape fixed the same IR
    is correct (feature SNR 32-43 dB). FP32 graphs are not affected.
    """
    import openvino as ov

    from damo_plugins.keypoints.export import OPENVINO_F32_CONFIG

    config: dict[str, Any] = dict(OPENVINO_F32_CONFIG)
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    core = ov.Core()
    if not static:
        compiled = core.compile_model(model, "CPU", config)
        return lambda image: [np.asarray(v) for v in compiled({0: image}).values()]
    cache: dict[tuple[int, ...], Any] = {}

    def run(image: np.ndarray) -> list[Any]:
        shape = tuple(int(d) for d in np.shape(image))
        if shape not in cache:
            fixed = model.clone()
            fixed.reshape({0: list(shape)})
            cache[shape] = core.compile_model(fixed, "CPU", config)
        return [np.asarray(v) for v in cache[shape]({0: image}).values()]

    return run


def compare_int8_model(
    fp32: Any,
    int8: Any,
    images: Sequence[np.ndarray],
    threads: int | None = None,
    static: bool = False,
) -> dict[str, float]:
    """:func:`int8_fidelity` of two graphs, both in OpenVINO with the f32 hint (``static``:
    compiled per input shape, see :func:`_openvino_runner`)."""
    run_ref, run_q = openvino_f32(fp32, threads, static), openvino_f32(int8, threads, static)
    return int8_fidelity([run_ref(x) for x in images], [run_q(x) for x in images])


# ------------------------------------------------------------- feature fidelity
def openvino_features(
    model: Any, threads: int | None = None, static: bool = False
) -> Callable[[np.ndarray], list[np.ndarray]]:
    """``image -> [feature maps]``: the maps every ``ROIAlign`` pools (P2..P5), computed by
    ``model``'s own backbone sub-graph (:func:`backbone_model`) compiled with the f32 hint;
    the FakeQuantize of an INT8 model are ancestors of those maps, so they are included.
    ``static``: see :func:`_openvino_runner`."""
    return _openvino_runner(backbone_model(to_openvino(model)), threads, static)


def ort_features(
    proto: Any, threads: int | None = None
) -> Callable[[np.ndarray], list[np.ndarray]]:
    """``image -> [feature maps]`` of an ONNX whole model (FP32 or QDQ) in ONNX Runtime,
    through its feature sub-graph (:func:`onnx_feature_model`)."""
    from damo_plugins.core.onnx_utils import ort_session

    sess = ort_session(onnx_feature_model(proto), threads=threads)
    name = sess.get_inputs()[0].name
    return lambda image: sess.run(None, {name: image})


def feature_fidelity(
    reference: Callable[[np.ndarray], list[np.ndarray]],
    candidate: Callable[[np.ndarray], list[np.ndarray]],
    images: Sequence[np.ndarray],
) -> dict[str, float]:
    """Quantization error of the FPN maps, a continuous measure that stays meaningful with
    random weights (detections of a random-weight model sit at the score threshold, so
    matching them mostly measures threshold flips).

    Per level ``pN`` (N = log2 of the stride, from the map's size against the image's):
    ``pN_cos``, the cosine similarity of the INT8 and FP32 maps, and ``pN_snr_db``,
    10 log10(sum ref^2 / sum (int8 - ref)^2); both are pooled over all images (sums over
    every element), so a large image weighs more. ``min_cos`` and ``min_snr_db`` are the
    worst level. An SNR of 20 dB means an error of 10 % of the signal's RMS.
    """
    sums: dict[str, np.ndarray] = {}
    for image in images:
        ref, out = reference(image), candidate(image)
        if len(ref) != len(out):
            raise DamoError(f"the two models give {len(ref)} and {len(out)} feature maps")
        for a, b in zip(ref, out):
            a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
            if a64.shape != b64.shape:
                raise DamoError(f"feature maps of shapes {a64.shape} and {b64.shape} differ")
            stride = image.shape[-2] / a64.shape[-2]
            key = f"p{round(np.log2(stride))}"
            acc = sums.setdefault(key, np.zeros(4))
            acc += [
                (a64 * b64).sum(),
                (a64 * a64).sum(),
                (b64 * b64).sum(),
                ((a64 - b64) ** 2).sum(),
            ]
    out_m: dict[str, float] = {}
    for key in sorted(sums, key=lambda k: int(k[1:])):
        ab, aa, bb, err = sums[key]
        out_m[f"{key}_cos"] = float(ab / np.sqrt(aa * bb)) if aa > 0 and bb > 0 else float(aa == bb)
        out_m[f"{key}_snr_db"] = float(10 * np.log10(aa / err)) if err > 0 else float("inf")
    if out_m:
        out_m["min_cos"] = min(v for k, v in out_m.items() if k.endswith("_cos"))
        out_m["min_snr_db"] = min(v for k, v in out_m.items() if k.endswith("_snr_db"))
    return out_m


# ------------------------------------------------------------------------ images
def read_bgr_images(
    source: str | Path,
    limit: int | None = None,
    short_edge: int = SHORT_EDGE,
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
#: worst FPN level's SNR (:func:`feature_fidelity`): 15 dB is an error of 18 % of the maps'
#: RMS. A bound that catches a broken execution (0 dB and below), not an accuracy target:
#: measured 32 dB (R50, random weights, ONNX Runtime) and 32-43 dB (small test model)
MIN_FEATURE_SNR_DB = 15.0


def fidelity_failures(m: dict[str, float]) -> list[str]:
    """Which of the ``--int8`` fidelity bounds ``m`` (from :func:`int8_fidelity`) misses."""
    bad = []
    if m["recall"] < MIN_RECALL:
        bad.append(f"recall {m['recall']:.3f} < {MIN_RECALL}")
    if m["precision"] < MIN_PRECISION:
        bad.append(f"precision {m['precision']:.3f} < {MIN_PRECISION}")
    if m["kp_p95_px"] > MAX_KP_P95_PX:
        bad.append(f"keypoint p95 displacement {m['kp_p95_px']:.2f} px > {MAX_KP_P95_PX}")
    if m.get("min_snr_db", np.inf) < MIN_FEATURE_SNR_DB:
        msg = f"FPN maps SNR {m['min_snr_db']:.1f} dB < {MIN_FEATURE_SNR_DB:g} dB"
        if m.get("static_min_snr_db", -np.inf) >= MIN_FEATURE_SNR_DB:
            msg += (
                f" (with a static input shape: {m['static_min_snr_db']:.1f} dB -- OpenVINO "
                "miscomputes these INT8 convolutions with dynamic shapes: call "
                "model.reshape({0: [1, 3, H, W]}) before compile_model)"
            )
        bad.append(msg)
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
    OpenVINO IR (``output`` .xml and its .bin) and measure fidelity on the held-out images
    (detections, :func:`int8_fidelity`, and FPN maps, :func:`feature_fidelity`).
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
    # as a plain compile_model runs the IR (dynamic shape), detections and FPN maps; the
    # maps are continuous, and meaningful where detections only flip at the threshold
    fidelity = compare_int8_model(proto, model, held)
    fidelity.update(feature_fidelity(openvino_features(proto), openvino_features(model), held))
    # the maps again with the input shape fixed: tells a quantization problem from
    # OpenVINO's dynamic-shape INT8 miscomputation (see _openvino_runner)
    fixed = feature_fidelity(
        openvino_features(proto, static=True), openvino_features(model, static=True), held
    )
    fidelity["static_min_cos"] = fixed["min_cos"]
    fidelity["static_min_snr_db"] = fixed["min_snr_db"]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        xml = Path(tmp) / target.name
        ov.save_model(model, str(xml), compress_to_fp16=False)
        os.replace(xml.with_suffix(".bin"), target.with_suffix(".bin"))
        os.replace(xml, target)
    return info, fidelity


def _check_placement(placed: Collection[str], allowed: Collection[str], what: str) -> None:
    """Both quantizer forms must quantize inside the backbone only, and something there: a
    quantizer elsewhere breaks the float heads' contract, none at all would be FP32 called
    INT8."""
    stray = sorted(set(placed) - set(allowed))
    if stray:
        raise DamoError(f"NNCF quantized {what} outside the backbone: {', '.join(stray[:5])}")
    if not placed:
        raise DamoError(
            "NNCF placed no quantizer in the Keypoint R-CNN: the result would be FP32",
            "check the calibration images",
        )


def _quantize_backbone(
    nncf: Any,
    sub: Any,
    dataset: Any,
    preset: str,
    subset_size: int,
    kept: list[str],
    advanced: Any,
    who: str,
) -> Any:
    """``nncf.quantize`` of the backbone sub-graph, the same for both model forms: NNCF's
    INFO lines (one per skipped quantizer) held back, any failure one clear line."""
    import logging

    log = logging.getLogger("nncf")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        return nncf.quantize(
            sub,
            dataset,
            preset=nncf.QuantizationPreset(preset),
            subset_size=subset_size,
            ignored_scope=nncf.IgnoredScope(names=kept, validate=False),
            advanced_parameters=advanced,
        )
    except DamoError:
        raise
    except Exception as exc:
        raise DamoError(
            f"{who} could not quantize the Keypoint R-CNN backbone: {type(exc).__name__}: "
            f"{first_line(exc)[:300]}"
        ) from exc
    finally:
        log.setLevel(level)
