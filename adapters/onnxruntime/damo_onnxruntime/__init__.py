"""damo-plugins-onnxruntime: the ONNX Runtime adapter (``damo_plugins`` entry point)."""

from __future__ import annotations

from damo_plugins.core.hookspecs import hookimpl


@hookimpl
def damo_adapters():
    from damo_onnxruntime.adapter import ONNXRuntimeAdapter

    return [ONNXRuntimeAdapter()]
