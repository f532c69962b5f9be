"""NNCF adapter: post-training quantization of OpenVINO and ONNX models."""

from __future__ import annotations

from damo_plugins.adapter import Adapter


class NNCFAdapter(Adapter):
    name = "nncf"
    backend = "nncf"
    backend_distribution = "nncf"
    capabilities = ()

    def devices(self) -> list[str]:
        # NNCF quantizes for a target device; it runs nothing itself.
        return ["CPU", "GPU", "NPU"]
