"""Small ONNX helpers shared by the core and the plugins."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from damo_plugins.core.errors import DamoError

#: the newest IR version every ONNX Runtime the package allows (>= 1.18) reads; onnx 1.23's
#: helpers write 14, which ORT 1.31 rejected (1.32 reads up to 14, rejects 15)
MAX_ORT_IR_VERSION = 10


def ort_session(model: Any, providers: list[str] | None = None, threads: int | None = None) -> Any:
    """An ONNX Runtime session for a ``ModelProto`` or a path, with clear errors."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    providers = providers or ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise DamoError(
            f"ONNX Runtime provider(s) not available here: {', '.join(missing)}",
            f"available: {', '.join(available)}",
        )
    source = model if isinstance(model, (str, bytes)) else None
    if source is None and hasattr(model, "SerializeToString"):
        source = ort_loadable(model).SerializeToString()
    if source is None:
        source = str(model)
    try:
        return ort.InferenceSession(source, sess_options=opts, providers=providers)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DamoError(f"ONNX Runtime cannot load the model: {first[:300]}") from exc


def ort_loadable(model: Any) -> Any:
    """``model`` (a ``ModelProto``) as ONNX Runtime accepts it: a copy stamped with IR version
    :data:`MAX_ORT_IR_VERSION` when onnx wrote a newer one (the graph's ops are the same; only
    the stamp is newer than this ORT reads), else ``model`` itself."""
    if model.ir_version <= MAX_ORT_IR_VERSION:
        return model
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.ir_version = MAX_ORT_IR_VERSION
    return copy


def value_specs(values: Iterable[Any]) -> list[Any]:
    """ONNX ValueInfo -> TensorSpec list (dynamic axes as their names)."""
    import onnx

    from damo_plugins.core.artifact import TensorSpec

    specs = []
    for v in values:
        tt = v.type.tensor_type
        dims: list[int | str] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or "?")
        try:
            dtype = str(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except Exception:
            dtype = "float32"
        specs.append(TensorSpec(v.name, dims, dtype))
    return specs


def initializer_param_count(model: Any) -> int:
    """Number of values in floating-point initializers (weights), as a parameter count."""
    import numpy as np
    import onnx

    floats = {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.INT8,
        onnx.TensorProto.UINT8,
    }
    total = 0
    for init in model.graph.initializer:
        if init.data_type in floats:
            total += int(np.prod(init.dims)) if init.dims else 1
    return total


#: operations whose FLOPs are counted, as ``torch.utils.flop_counter`` counts them (2 x MACs
#: of convolutions and matrix products; element-wise work is not counted there either)
FLOP_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def graph_flops(model: Any) -> int | None:
    """FLOPs of one run of an ONNX graph at its declared input shapes, read from the graph.

    Counted the way :mod:`torch.utils.flop_counter` counts a PyTorch model (2 x multiply-
    accumulates of Conv/ConvTranspose/MatMul/Gemm, nothing else), so ``info`` on a model and
    on its export agree. Shapes come from ONNX shape inference; a graph whose counted ops have
    a dynamic dimension gives ``None`` (the count depends on the input size).
    """
    import math

    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        return None
    shapes: dict[str, list[int | None]] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    total = 0
    for node in inferred.graph.node:
        if node.op_type not in FLOP_OPS:
            continue
        ins = [shapes.get(n) for n in node.input[:2]]
        out = shapes.get(node.output[0])
        if out is None or any(s is None for s in ins) or None in out:
            return None
        a, b = ins
        if None in a or None in b:  # type: ignore[operator]
            return None
        attrs = {at.name: onnx.helper.get_attribute_value(at) for at in node.attribute}
        if node.op_type == "Conv":  # weight [Cout, Cin/groups, k...]: per output Cin/groups*k
            macs = math.prod(out) * math.prod(b[1:])  # type: ignore[index]
        elif node.op_type == "ConvTranspose":  # weight [Cin, Cout/groups, k...]: per input
            macs = math.prod(a) * math.prod(b[1:])  # type: ignore[arg-type,index]
        elif node.op_type == "Gemm":
            k = a[0] if attrs.get("transA", 0) else a[-1]  # type: ignore[index]
            macs = math.prod(out) * int(k)  # type: ignore[arg-type]
        elif len(b) == 1:  # type: ignore[arg-type]
            # a matrix-vector product (a DFL integral written as prob @ bins, as this
            # project exported it before the per-level decode): torch's counter has no
            # rule for it, so it is left out here too and the counts of a model and its
            # export agree
            continue
        else:
            macs = math.prod(out) * int(a[-1])  # type: ignore[index]
        total += 2 * int(macs)
    return total
