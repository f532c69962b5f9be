"""``convert``: hand a PyTorch or ONNX model to a backend's own format (OpenVINO IR).

The conversion itself belongs to the adapter (``damo-plugins-openvino``); this pass only
makes it a recipe step and verifies the converted model against its source.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from damo_plugins.core.artifact import ModelArtifact
from damo_plugins.core.hookspecs import hookimpl
from damo_plugins.core.passes import Pass, PassConfig, PassContext


class ConvertConfig(PassConfig):
    to: Literal["openvino"] = "openvino"
    adapter: str = Field("openvino", description="adapter that performs the conversion")
    compress_to_fp16: bool = Field(False, description="store weights as FP16 in the IR")
    tolerance: float = Field(1e-4, gt=0)


class ConvertPass(Pass):
    """Convert to OpenVINO IR through the OpenVINO adapter."""

    name = "convert"
    accepts = ("torch", "onnx")
    produces = "openvino"
    Config = ConvertConfig
    description = "PyTorch/ONNX -> OpenVINO IR (through an adapter), verified"

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        cfg: ConvertConfig = self.config  # type: ignore[assignment]
        adapter = ctx.manager.get_adapter(cfg.adapter)
        return adapter.convert(artifact, compress_to_fp16=cfg.compress_to_fp16)


@hookimpl
def damo_passes() -> list[type[Pass]]:
    return [ConvertPass]
