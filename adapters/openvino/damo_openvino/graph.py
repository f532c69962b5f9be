"""Graph helpers on ``openvino.Model``: find a detector's decode tail, make it INT8-safe.

:func:`decode_nodes` runs the shared structural walk
(:func:`damo_plugins.passes.quantize.walk_decode`) on an OpenVINO graph and returns the
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

from typing import Any

import numpy as np

from damo_plugins.passes.quantize import (
    CONST,
    INPUT,
    OP,
    SHAPE,
    SIGNATURE,
    SIGNATURE_OPS,
    STOP,
    walk_decode,
)

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
