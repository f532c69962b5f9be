"""PyTorch -> ONNX export, checked by ``onnx.checker``.

Exporter choice: the TorchScript-based exporter (``dynamo=False``) is the default. On this
stack (torch 2.13, onnx 1.23, ONNX Runtime 1.31) it exports the DAMO-YOLO T/S/M models at
opsets 16–20 in seconds, and its graphs run in ONNX Runtime and OpenVINO unchanged; the
dynamo-based exporter is slower, fixes dynamic loop counts to the example's value, and at
opset 17 emitted an invalid ``ReduceMax`` on our keypoint post-processing. ``exporter:
dynamo`` selects it for models the TorchScript path cannot trace.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

from damo_plugins.core.artifact import ModelArtifact, TensorSpec
from damo_plugins.core.errors import DamoError, first_line


def export_onnx(
    artifact: ModelArtifact,
    *,
    opset: int = 17,
    dynamic_batch: bool = False,
    exporter: str = "torchscript",
    seed: int = 0,
) -> Any:
    """Export a PyTorch artifact; return the checked ``onnx.ModelProto``."""
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
    input_names = [t.name for t in artifact.inputs]
    with torch.no_grad():
        n_out = len(artifact.run(artifact.example_inputs(seed=seed)))
    output_names = [t.name for t in artifact.outputs][:n_out]
    if len(output_names) != n_out:
        output_names = [f"output{i}" for i in range(n_out)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                dyn = None
                if dynamic_batch:
                    batch = torch.export.Dim("batch")
                    dyn = tuple({0: batch} for _ in args)
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
                axes = None
                if dynamic_batch:
                    axes = {n: {0: "batch"} for n in input_names + output_names}
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
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise DamoError(
            f"exported ONNX model fails the checker: {str(exc).splitlines()[0][:300]}"
        ) from exc
    return proto


def spec_names(specs: list[TensorSpec]) -> list[str]:
    return [s.name for s in specs]
