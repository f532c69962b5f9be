"""Intel Neural Compressor 3.x adapter (PyTorch PT2E static quantization)."""

from __future__ import annotations

from damo_plugins.adapter import Adapter


class INCAdapter(Adapter):
    name = "inc"
    backend = "neural_compressor"
    backend_distribution = "neural-compressor"
    capabilities = ()
