"""ONNX Runtime adapter: sessions with chosen providers, static QDQ quantization."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from damo_plugins.adapter import Adapter
from damo_plugins.artifact import ModelArtifact
from damo_plugins.errors import DamoError


class ONNXRuntimeAdapter(Adapter):
    name = "onnxruntime"
    backend = "onnxruntime"
    backend_distribution = "onnxruntime"
    capabilities = ("run",)

    def devices(self) -> list[str]:
        ort = self.require_backend()
        return ["CPU"] + (
            ["GPU"] if "CUDAExecutionProvider" in ort.get_available_providers() else []
        )

    def run(
        self, artifact: ModelArtifact, feeds: Sequence[np.ndarray], device: str = "CPU"
    ) -> list[np.ndarray]:
        if artifact.format != "onnx":
            raise DamoError(
                f"ONNX Runtime runs ONNX models, not {artifact.format}", "add an export step"
            )
        return artifact.run(feeds)
