"""Graph helpers on ``openvino.Model``: the decode tail, INT8-safe constants, ports and sizes.

Shared by the OpenVINO, NNCF and INC adapters (none imports another adapter).

:func:`decode_nodes` runs the shared structural walk
(:func:`damo_plugins.lib.decode.walk_decode`) on an OpenVINO graph and returns the
friendly names NNCF's ``IgnoredScope`` addresses.

:func:`broadcast_decode_constants` works around an OpenVINO CPU plugin failure measured on
upstream DAMO-YOLO-S (OpenVINO 2026.4): once any ``FakeQuantize`` is in the model, a decode
left in float whose stride multiply broadcasts a ``[1, A, 1]`` constant fails to compile
(``Check 'backward_compatible_check || in_out_elements_equal' failed ... Reshape
/head/Unsqueeze``). Expanding such constants to the full output shape (``[1, A, 4]``) gives
identical numbers and compiles. We apply it to constants of element-wise ops in the decode
tail only, and only while the expanded constant stays small.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from damo_plugins.core.artifact import TensorSpec
from damo_plugins.lib.decode import (
    CONST,
    INPUT,
    OP,
    SHAPE,
    SIGNATURE,
    SIGNATURE_OPS,
    STOP,
    walk_decode,
)

if TYPE_CHECKING:  # pragma: no cover
    from damo_plugins.core.artifact import ModelArtifact

CONV_TYPES = frozenset(
    {"Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData"}
)
ELEMENTWISE = frozenset({"Multiply", "Add", "Subtract", "Divide"})
#: largest constant (elements) the broadcast fix may create
MAX_BROADCAST = 1 << 22


def _is_const(node: Any) -> bool:
    return node.get_type_name() == "Constant"


def _kind(node: Any) -> str:
    t = node.get_type_name()
    if t in CONV_TYPES:
        return STOP
    srcs = [i.get_source_output().get_node() for i in node.inputs()]
    if (
        t == "Add"
        and len(srcs) == 2
        and any(s.get_type_name() in CONV_TYPES for s in srcs)
        and any(_is_const(s) for s in srcs)
    ):
        return STOP  # a convolution's bias: part of the conv, not of the decode
    if t == "MatMul" and any(
        _is_const(s) and len(s.get_output_shape(0)) == 2 and min(s.get_output_shape(0)) > 1
        for s in srcs
    ):
        return STOP  # a learned linear layer
    if t == "Constant":
        return CONST
    if t == "Parameter":
        return INPUT
    if t in ("ShapeOf",):
        return SHAPE
    if t in SIGNATURE_OPS:
        return SIGNATURE
    return OP


def decode_nodes(model: Any) -> list[str]:
    """Friendly names of the ops forming the decode tail of ``model`` (empty if none)."""
    ops = {op.get_name(): op for op in model.get_ordered_ops()}

    def inputs_of(name: str) -> list[str]:
        return [i.get_source_output().get_node().get_name() for i in ops[name].inputs()]

    outs = [r.input_value(0).get_node().get_name() for r in model.get_results()]
    found = walk_decode(outs, inputs_of, lambda n: _kind(ops[n]))
    return [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_name() in found]


def broadcast_decode_constants(model: Any, names: list[str] | None = None) -> int:
    """Expand size-1 axes of constants feeding element-wise decode ops (in place).

    Returns how many constants were replaced. Numerics are unchanged: the op broadcast the
    constant to exactly this shape anyway.
    """
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    wanted = set(names if names is not None else decode_nodes(model))
    replaced = 0
    for node in model.get_ordered_ops():
        if node.get_type_name() not in ELEMENTWISE or node.get_friendly_name() not in wanted:
            continue
        out_shape = node.get_output_partial_shape(0)
        if not out_shape.is_static:
            continue
        full = [int(d) for d in out_shape.to_shape()]
        for port in node.inputs():
            src = port.get_source_output().get_node()
            if not _is_const(src):
                continue
            shape = list(src.get_output_shape(0))
            if len(shape) != len(full) or shape == full or int(np.prod(full)) > MAX_BROADCAST:
                continue
            if any(s not in (1, f) for s, f in zip(shape, full)):
                continue
            value = np.broadcast_to(src.get_data(), full).copy()
            const = ops.constant(value, dtype=ov.Type(value.dtype))
            const.set_friendly_name(src.get_friendly_name() + "/broadcast")
            port.replace_source_output(const.output(0))
            replaced += 1
    if replaced:
        model.validate_nodes_and_infer_types()
    return replaced


def count_types(model: Any, *types: str) -> int:
    return sum(1 for op in model.get_ordered_ops() if op.get_type_name() in types)


def decode_inputs_quantized(model: Any, names: list[str]) -> list[str]:
    """Decode ops (by name) that read a ``FakeQuantize`` output — should be empty."""
    wanted = set(names)
    bad = []
    for op in model.get_ordered_ops():
        if op.get_friendly_name() not in wanted:
            continue
        for port in op.inputs():
            if port.get_source_output().get_node().get_type_name() == "FakeQuantize":
                bad.append(op.get_friendly_name())
                break
    return bad


# ------------------------------------------------------- ports, names and sizes of an IR
_CORE: Any = None


def ov_core() -> Any:
    """One ``ov.Core`` per process (creating it enumerates devices, which is slow)."""
    global _CORE
    if _CORE is None:
        import openvino as ov

        _CORE = ov.Core()
    return _CORE


def name_ports(model: Any, artifact: ModelArtifact) -> None:
    """Give the IR the artifact's input/output names (PyTorch conversion loses them)."""
    for port, spec in zip(model.inputs, artifact.inputs):
        port.get_tensor().set_names({spec.name})
    for port, spec in zip(model.outputs, artifact.outputs):
        if spec.name:
            port.get_tensor().set_names({spec.name})


def port_specs(ports: Any) -> list[TensorSpec]:
    specs = []
    for i, port in enumerate(ports):
        names = port.get_names()
        name = sorted(names)[0] if names else f"port{i}"
        pshape = port.get_partial_shape()
        dims: list[int | str] = [d.get_length() if d.is_static else "?" for d in pshape]
        dtype = (
            port.get_element_type().to_dtype().name
            if hasattr(port.get_element_type(), "to_dtype")
            else "float32"
        )
        specs.append(TensorSpec(name, dims, dtype))
    return specs


def describe_ir(artifact: ModelArtifact, model: Any) -> ModelArtifact:
    """Fill ``artifact`` (which holds ``model``) with what is read from the IR graph: its
    port specs, parameter count and FLOPs; return it.

    One place for every adapter that produces or reads an IR (convert, load, NNCF and INC
    quantization), so an IR from any of them reports the same facts the same way.
    """
    artifact.inputs, artifact.outputs = port_specs(model.inputs), port_specs(model.outputs)
    artifact.meta["params"] = ir_param_count(model)
    artifact.meta["flops"] = ir_flops(model)
    return artifact


def ir_param_count(model: Any) -> int:
    import numpy as np

    total = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Constant":
            et = op.get_output_element_type(0)
            if et.is_real() or et.get_type_name() in ("i8", "u8", "i4", "u4"):
                shape = list(op.get_output_shape(0))
                n = int(np.prod(shape)) if shape else 1
                if n > 1:
                    total += n
    return total


def ir_flops(model: Any) -> int | None:
    """FLOPs of one inference of an OpenVINO model at its static shapes, read from the graph.

    Counted as :mod:`torch.utils.flop_counter` counts PyTorch (2 x multiply-accumulates of
    convolutions and matrix products), so a model, its ONNX export and its IR agree. An INT8
    IR has the same count as its FP32 source: FLOPs describe the arithmetic, not its
    precision. ``None`` when a counted op has a dynamic shape.
    """
    import math

    total = 0
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind not in ("Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData"):
            continue
        out, a, b = (
            op.get_output_partial_shape(0),
            op.input(0).get_partial_shape(),
            op.input(1).get_partial_shape(),
        )
        if not (out.is_static and a.is_static and b.is_static):
            return None
        out_s, a_s, b_s = list(out.to_shape()), list(a.to_shape()), list(b.to_shape())
        if kind == "Convolution":  # weights [Cout, Cin, k...]
            macs = math.prod(out_s) * math.prod(b_s[1:])
        elif kind == "GroupConvolution":  # weights [G, Cout/G, Cin/G, k...]
            macs = math.prod(out_s) * math.prod(b_s[2:])
        elif kind == "ConvolutionBackpropData":  # weights [Cin, Cout, k...]: per input value
            macs = math.prod(a_s) * math.prod(b_s[1:])
        elif len(b_s) == 1:  # matrix-vector (a DFL integral, prob @ bins): as by torch
            continue
        else:
            transpose_a = bool(op.get_attributes().get("transpose_a", False))
            k = a_s[-2] if transpose_a and len(a_s) > 1 else a_s[-1]
            macs = math.prod(out_s) * k
        total += 2 * int(macs)
    return total
