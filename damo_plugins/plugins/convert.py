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
from damo_plugins.core.verify import Verification


class ConvertConfig(PassConfig):
    to: Literal["openvino"] = "openvino"
    adapter: str = Field("openvino", description="adapter that performs the conversion")
    compress_to_fp16: bool = Field(False, description="store weights as FP16 in the IR")
    tolerance: float = Field(1e-4, gt=0, description="float models: max relative error")
    int8_min_cosine: float = Field(
        0.99,
        gt=0,
        le=1,
        description="quantized (QDQ) models: min output cosine of OpenVINO vs ONNX Runtime on "
        "generated images (the two runtimes round requantized activations differently, so "
        "no element tolerance holds; measured 0.9993 on the demo model)",
    )
    int8_min_agreement: float = Field(
        0.9, ge=0, le=1, description="quantized detectors: min top-detection agreement"
    )


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

    def verify(self, before: ModelArtifact, after: ModelArtifact, ctx: PassContext) -> Verification:
        """A float model: outputs within ``tolerance`` (the default check). A quantized ONNX
        graph: the same INT8 model in two runtimes, compared the way INT8 is (cosine and
        top-detection agreement), since each runtime rounds its requantized activations
        its own way (measured: max relative error 0.15 with cosine 0.9993)."""
        from damo_plugins.lib.fidelity import quantized_ops

        if before.format != "onnx" or not quantized_ops(before)["quantized_ops"]:
            return super().verify(before, after, ctx)
        from damo_plugins.data.calibration import generated_images
        from damo_plugins.lib.fidelity import as_feeds, compare_int8, runner

        cfg: ConvertConfig = self.config  # type: ignore[assignment]
        shape = before.inputs[0].concrete() if before.inputs else None
        held = generated_images(8, input_shape=shape, seed=ctx.seed + 1)
        run_ref, run_new = runner(before, ctx.manager), runner(after, ctx.manager)
        refs = [run_ref(as_feeds(x)) for x in held]
        outs = [run_new(as_feeds(x)) for x in held]
        m = compare_int8(refs, outs, [t.name for t in after.outputs])
        ok = m["cosine_min"] is not None and m["cosine_min"] >= cfg.int8_min_cosine
        msg = (
            f"INT8 graph in OpenVINO vs ONNX Runtime on {m['samples']} generated images: "
            f"cosine min {m['cosine_min']:.4f} (>= {cfg.int8_min_cosine})"
        )
        if m["detector"]:
            ok = ok and m["top_detection_agreement"] >= cfg.int8_min_agreement
            msg += (
                f", top-detection agreement {m['top_detection_agreement']:.2f} "
                f"(>= {cfg.int8_min_agreement})"
            )
        return Verification(ok, m, msg)


@hookimpl
def damo_passes() -> list[type[Pass]]:
    return [ConvertPass]
