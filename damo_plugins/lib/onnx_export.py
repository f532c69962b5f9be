"""PyTorch -> ONNX export, checked by ``onnx.checker``.

Exporter choice: the TorchScript-based exporter (``dynamo=False``) is the default. On this
stack (torch 2.13, onnx 1.23, ONNX Runtime 1.31) it exports the DAMO-YOLO T/S/M models at
opsets 16–20 in seconds, and its graphs run in ONNX Runtime and OpenVINO unchanged; the
dynamo-based exporter is slower, fixes dynamic loop counts to the example's value, and at
opset 17 emitted an invalid ``ReduceMax`` on our keypoint post-processing. ``exporter:
dynamo`` selects it for models the TorchScript path cannot trace.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import json
import warnings
from collections.abc import Iterator
from typing import Any

from damo_plugins.core.artifact import ModelArtifact, TensorSpec
from damo_plugins.core.errors import DamoError, first_line

_DYNAMIC_SIZE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "damo_plugins_dynamic_size", default=False
)


def tracing_dynamic_size() -> bool:
    """Whether the model is being traced for an export with dynamic height/width.

    Model code that derives tensors from input sizes (a detector's anchor grid) reads this to
    choose between Python ints — which tracers freeze into constants, the right thing for a
    fixed-size export — and traced sizes, which become shape ops that follow the runtime size.
    A context variable rather than a module flag, so that models the export cannot see into
    (an fx ``GraphModule`` after graph-level re-parameterization) still see it.
    """
    return _DYNAMIC_SIZE.get()


@contextlib.contextmanager
def dynamic_size_tracing(enabled: bool = True) -> Iterator[None]:
    """Within the block, :func:`tracing_dynamic_size` returns ``enabled``."""
    token = _DYNAMIC_SIZE.set(enabled)
    try:
        yield
    finally:
        _DYNAMIC_SIZE.reset(token)


#: ONNX ``metadata_props`` key of the input shape a dynamic model was exported at
INPUT_SHAPE_KEY = "damo_plugins.input_shape"


def export_onnx(
    artifact: ModelArtifact,
    *,
    opset: int = 17,
    dynamic_batch: bool = False,
    exporter: str = "torchscript",
    seed: int = 0,
    dynamic_size: bool = False,
) -> Any:
    """Export a PyTorch artifact; return the checked ``onnx.ModelProto``.

    ``dynamic_batch`` makes the inputs' batch axis dynamic, ``dynamic_size`` their height and
    width; an *output* axis is made dynamic only if it really changes with them (found by
    running the model once more at batch 2 / a larger size), so ``scores [N, A, C]`` keeps its
    class count fixed and its anchor count fixed unless the size is dynamic.
    """
    import onnx
    import torch

    if not artifact.inputs:
        raise DamoError(
            "cannot export: the model's input shape is unknown", "give input_shape / --input-shape"
        )
    module = artifact.model
    was_training = module.training
    module.eval()
    args = tuple(torch.from_numpy(f) for f in artifact.example_inputs(seed=seed))
    axes: dict[str, dict[int, str]] | None = None
    input_names = [t.name for t in artifact.inputs]
    with torch.no_grad():
        n_out = len(artifact.run(artifact.example_inputs(seed=seed)))
    output_names = [t.name for t in artifact.outputs][:n_out]
    if len(output_names) != n_out:
        output_names = [f"output{i}" for i in range(n_out)]
    try:
        with warnings.catch_warnings(), dynamic_size_tracing(dynamic_size):
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                dyn = None
                if dynamic_batch or dynamic_size:
                    dims: dict[int, Any] = {}
                    if dynamic_batch:
                        dims[0] = torch.export.Dim("batch")
                    if dynamic_size:
                        dims[2], dims[3] = torch.export.Dim("height"), torch.export.Dim("width")
                    dyn = tuple(dict(dims) for _ in args)
                program = torch.onnx.export(
                    module,
                    args,
                    dynamo=True,
                    opset_version=opset,
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_shapes=dyn,
                    verbose=False,
                )
                proto = program.model_proto
            else:
                if dynamic_batch or dynamic_size:
                    axes = _dynamic_axes(
                        module, artifact, input_names, output_names, dynamic_batch, dynamic_size
                    )
                buf = io.BytesIO()
                torch.onnx.export(
                    module,
                    args,
                    buf,
                    dynamo=False,
                    opset_version=opset,
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_axes=axes,
                    do_constant_folding=True,
                )
                proto = onnx.load_from_string(buf.getvalue())
    except DamoError:
        raise
    except Exception as exc:
        first = first_line(exc)
        raise DamoError(
            f"ONNX export ({exporter}) failed: {type(exc).__name__}: {first[:300]}",
            "try exporter: dynamo (or torchscript), or another opset",
        ) from exc
    finally:
        module.train(was_training)
    if exporter != "dynamo" and (dynamic_batch or dynamic_size):
        _fix_output_dims(proto, axes or {}, artifact, module)
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise DamoError(
            f"exported ONNX model fails the checker: {str(exc).splitlines()[0][:300]}"
        ) from exc
    if dynamic_size:
        _check_other_size(proto, artifact, module)
    if dynamic_batch or dynamic_size:
        # The shape it was exported at, for tools that must pick one (``damo-opt bench``);
        # OpenVINO carries it into the IR's rt_info (``framework``) on conversion.
        entry = proto.metadata_props.add()
        entry.key, entry.value = INPUT_SHAPE_KEY, json.dumps(artifact.input_shape)
    return proto


def _fix_output_dims(
    proto: Any, axes: dict[str, dict[int, str]], artifact: ModelArtifact, module: Any
) -> None:
    """Write the real output shapes into the graph: static axes as numbers, dynamic ones under
    our names. (Shape inference after a dynamic input names *every* output axis it cannot
    prove constant, e.g. a class count behind a Reshape — which readers then take as dynamic.)"""
    import torch

    feeds = [torch.from_numpy(f) for f in artifact.example_inputs()]
    with torch.no_grad():
        outs = module(*feeds)
    flat = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    for out, ref in zip(proto.graph.output, flat):
        dyn = axes.get(out.name, {})
        dims = out.type.tensor_type.shape.dim
        if len(dims) != ref.dim():
            continue
        for ax, d in enumerate(dims):
            if ax in dyn:
                d.dim_param = dyn[ax]
            else:
                d.dim_value = int(ref.shape[ax])


def _check_other_size(proto: Any, artifact: ModelArtifact, module: Any) -> None:
    """A model exported with dynamic height/width must compute the right thing at another
    size: tracing turns Python ints taken from shapes (an anchor grid's size) into constants,
    and such a graph fails or is silently wrong elsewhere. Checked at +32 px."""
    import numpy as np
    import torch

    from damo_plugins.core.onnx_utils import ort_session

    shape = artifact.inputs[0].concrete()
    if len(shape) != 4:
        raise DamoError("dynamic height/width needs a 4-D image input [N, C, H, W]")
    shape[2], shape[3] = shape[2] + 32, shape[3] + 32
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    try:
        got = ort_session(proto).run(None, {proto.graph.input[0].name: x})
        with torch.no_grad():
            ref = module(torch.from_numpy(x))
        refs = [t.numpy() for t in (ref if isinstance(ref, (list, tuple)) else [ref])]
        ok = all(
            g.shape == r.shape
            and float(np.abs(g - r).max()) <= 1e-3 * max(1.0, float(np.abs(r).max()))
            for g, r in zip(got, refs)
        )
    except Exception:
        ok = False
    if not ok:
        raise DamoError(
            f"the exported graph is wrong at another size ({shape[2]}x{shape[3]}): this model "
            "fixes its input size when traced (sizes read from tensors become constants)",
            "export without --dynamic (or only with --dynamic-batch), at the size you deploy "
            "(--imgsz)",
        )


def _dynamic_axes(
    module: Any,
    artifact: ModelArtifact,
    input_names: list[str],
    output_names: list[str],
    batch: bool,
    size: bool,
) -> dict[str, dict[int, str]]:
    """``dynamic_axes`` for the TorchScript exporter: the chosen input axes, and each output
    axis whose length changes when the batch (to 2) or the size (by 32 px) changes."""
    import torch

    def shapes(n: int, extra: int) -> list[tuple[int, ...]]:
        feeds = []
        for spec in artifact.inputs:
            shape = spec.concrete()
            shape[0] = n
            if extra and len(shape) == 4:
                shape[2], shape[3] = shape[2] + extra, shape[3] + extra
            feeds.append(torch.zeros(shape))
        with torch.no_grad():
            outs = module(*feeds)
        flat = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        return [tuple(t.shape) for t in flat if isinstance(t, torch.Tensor)]

    base = shapes(1, 0)
    by_batch = shapes(2, 0) if batch else base
    by_size = shapes(1, 32) if size else base
    axes: dict[str, dict[int, str]] = {}
    for name in input_names:
        axes[name] = {
            **({0: "batch"} if batch else {}),
            **({2: "height", 3: "width"} if size else {}),
        }
    for i, name in enumerate(output_names):
        if i >= len(base):
            break
        out: dict[int, str] = {}
        for ax, n in enumerate(base[i]):
            if by_batch[i][ax] != n:
                out[ax] = "batch"
            elif by_size[i][ax] != n:
                out[ax] = f"{name}_{ax}"
        if out:
            axes[name] = out
    return axes


def spec_names(specs: list[TensorSpec]) -> list[str]:
    return [s.name for s in specs]
