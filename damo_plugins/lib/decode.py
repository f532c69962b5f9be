"""The decode tail of a detector: found structurally, kept in floating point by quantizers.

Quantizing DAMO-YOLO's decode (sigmoid scores, softmax over the distance bins, integral,
x stride, distance -> box) wrecks its outputs: scores collapse to a few levels and boxes jump
by whole bins times the stride. :func:`walk_decode` finds that sub-graph *structurally* — from
each model output back through the element-wise and shape ops to the last convolutions — so
it works on user exports with arbitrary node names; each adapter keeps what it finds in
floating point (NNCF ``ignored_scope``, ONNX Runtime ``nodes_to_exclude``, INC observers).
The convolutions themselves stay INT8. The walk is format-neutral; :func:`onnx_decode_nodes`
runs it on ONNX graphs and :mod:`damo_plugins.lib.openvino_graph` on OpenVINO models.

In a static export the anchor grid is a constant (skipped by the walk); in an export with
dynamic height/width it is computed from the feature maps' shapes (``Shape``/``ShapeOf`` ->
``Range`` -> ...). Shape reads end the walk (they are part of the tail, their input is not),
so the grid joins the float tail and the walk never crosses into the backbone through them
(``tests/plugins/test_dynamic_export.py`` checks both forms, and INT8 of the dynamic one).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    pass

#: what a node is to the walk (see :func:`walk_decode`)
STOP, CONST, INPUT, SHAPE, SIGNATURE, OP = "stop", "const", "input", "shape", "signature", "op"

#: ops that only a decode/post-processing tail has right before the outputs
SIGNATURE_OPS = frozenset({"Sigmoid", "Softmax", "LogSoftmax"})


def walk_decode(
    outputs: Iterable[Hashable],
    inputs_of: Callable[[Any], Iterable[Hashable]],
    kind_of: Callable[[Any], str],
) -> set[Hashable]:
    """Nodes between the model outputs and the last convolutions that form a decode tail.

    Format-neutral: ``outputs`` are the nodes producing the model outputs, ``inputs_of(n)``
    the nodes feeding ``n`` and ``kind_of(n)`` classifies a node as

    * ``stop``: a convolution (or a learned linear layer) — the boundary, stays quantized;
    * ``const``: a constant/initializer — skipped;
    * ``input``: a graph input — reaching one means this output is not a conv head's tail;
    * ``shape``: reads only a tensor's shape — part of the tail, not walked through;
    * ``signature``: sigmoid/softmax — part of the tail and the mark of a decode;
    * ``op``: anything else — part of the tail if the output's walk qualifies.

    An output contributes its walk only if it stays behind convolutions and contains a
    signature op: a classifier's ``Gemm`` logits or a feature map do not qualify.
    """
    found: set[Hashable] = set()
    for out in outputs:
        seen: set[Hashable] = set()
        stack = [out]
        qualifies, signature = True, False
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            kind = kind_of(node)
            if kind in (STOP, CONST):
                continue
            if kind == INPUT:
                qualifies = False
                break
            seen.add(node)
            if kind == SIGNATURE:
                signature = True
            if kind != SHAPE:
                stack.extend(inputs_of(node))
        if qualifies and signature:
            found |= seen
    return found


def _onnx_kind(node: Any, initializers: dict[str, Any]) -> str:
    op = node.op_type
    if op in ("Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "Gemm"):
        return STOP
    if op == "MatMul":
        # A learned linear layer (2-D weight) is a boundary; the integral's bin vector is not.
        for name in node.input:
            init = initializers.get(name)
            if init is not None and len(init.dims) == 2 and min(init.dims) > 1:
                return STOP
        return OP
    if op == "Constant":
        return CONST
    if op == "Shape":
        return SHAPE
    if op in SIGNATURE_OPS:
        return SIGNATURE
    return OP


def onnx_decode_nodes(model: Any) -> list[str]:
    """Names of the ONNX nodes forming a detector's decode tail (empty if there is none).

    Nodes need names (see :func:`name_onnx_nodes`); the list is in graph order.
    """
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    producer: dict[str, Any] = {}
    for node in graph.node:
        for out in node.output:
            producer[out] = node
    inputs = {i.name for i in graph.input} - set(initializers)
    by_id = {id(n): n for n in graph.node}
    INPUT_NODE = "<input>"

    def inputs_of(nid: Any) -> list[Any]:
        res = []
        for name in by_id[nid].input:
            if name in producer:
                res.append(id(producer[name]))
            elif name in inputs:
                res.append(INPUT_NODE)
        return res

    def kind_of(nid: Any) -> str:
        if nid == INPUT_NODE:
            return INPUT
        return _onnx_kind(by_id[nid], initializers)

    outs = [id(producer[o.name]) for o in graph.output if o.name in producer]
    found = walk_decode(outs, inputs_of, kind_of)
    return [n.name for n in graph.node if id(n) in found]


def name_onnx_nodes(model: Any) -> Any:
    """Give every unnamed ONNX node a unique name (backends address nodes by name)."""
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)
    return model
