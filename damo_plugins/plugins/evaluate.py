"""``evaluate``: COCO mAP of a detector in any format, as a recipe step.

Compression is only honest when accuracy is measured after every step. This pass runs the
artifact as it is — PyTorch eagerly, ONNX in ONNX Runtime, IR in OpenVINO (f32 inference
precision, so the number is the model's and not the CPU's default bf16) — on a COCO-format
validation set, applies DAMO's multi-class NMS and scores with pycocotools. The model
passes through unchanged; ``mAP`` and ``mAP50`` go into the report.

Data: a folder in our layout (``DATA/val/`` + ``DATA/val.json``), or ``generated`` for the
project's deterministic synthetic set (made once per process in a temporary folder).
"""

from __future__ import annotations

from pydantic import Field

from damo_plugins.core.artifact import ModelArtifact
from damo_plugins.core.errors import DamoError
from damo_plugins.core.hookspecs import hookimpl
from damo_plugins.core.passes import Pass, PassConfig, PassContext
from damo_plugins.core.verify import Verification
from damo_plugins.data.evaluate import dataset_for, evaluate_artifact


class EvaluateConfig(PassConfig):
    data: str = Field(
        "generated", description="data folder (DATA/val + DATA/val.json) or 'generated'"
    )
    split: str = Field("val", description="which split of the folder")
    images: int = Field(100, ge=1, description="images to generate for data: generated")
    limit: int | None = Field(None, ge=1, description="evaluate only the first N images")
    seed: int = Field(0, description="seed of the generated data")
    conf: float = Field(0.05, ge=0, le=1)
    iou: float = Field(0.7, gt=0, le=1)
    min_map: float | None = Field(None, ge=0, le=1, description="fail below this mAP@[.5:.95]")


class EvaluatePass(Pass):
    """Measure COCO mAP; the model passes through unchanged."""

    name = "evaluate"
    accepts = ("torch", "onnx", "openvino")
    Config = EvaluateConfig
    measures_only = True
    description = "COCO mAP@[.5:.95] / mAP@.5 of a detector on a validation set"

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        cfg: EvaluateConfig = self.config  # type: ignore[assignment]
        shape = artifact.input_shape
        if len(shape) != 4 or shape[2] != shape[3]:
            raise DamoError(f"evaluate needs a square image input [N, 3, S, S], not {shape}")
        dataset = dataset_for(cfg, shape[2])
        metrics = evaluate_artifact(artifact, dataset, cfg, ctx.manager)
        ctx.extra["evaluation"] = {
            "mAP": metrics["mAP"],
            "mAP50": metrics["mAP50"],
            "images": cfg.limit or len(dataset),
        }
        ctx.log(f"  mAP@[.5:.95] {metrics['mAP']:.4f}, mAP@.5 {metrics['mAP50']:.4f}")
        out = artifact.derive()
        out.path = artifact.path
        return out

    def verify(self, before: ModelArtifact, after: ModelArtifact, ctx: PassContext) -> Verification:
        ev = ctx.extra.get("evaluation", {})
        floor = self.config.min_map  # type: ignore[attr-defined]
        ok = floor is None or ev.get("mAP", 0.0) >= floor
        msg = f"mAP {ev.get('mAP', 0):.4f}" + (f" (floor {floor})" if floor is not None else "")
        return Verification(ok, dict(ev), msg)


@hookimpl
def damo_passes() -> list[type[Pass]]:
    return [EvaluatePass]
