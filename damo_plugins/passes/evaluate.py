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

import functools
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from damo_plugins.artifact import ModelArtifact
from damo_plugins.errors import DamoError
from damo_plugins.passes.base import Pass, PassConfig, PassContext
from damo_plugins.verify import Verification


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


@functools.lru_cache(maxsize=4)
def generated_data(images: int, seed: int) -> Path:
    """The synthetic validation set, written once per process (deterministic)."""
    from damo_plugins.data.synthetic import generate

    root = Path(tempfile.mkdtemp(prefix="damo-eval-data-"))
    return generate(root, train=0, val=images, seed=seed)


def dataset_for(cfg: EvaluateConfig, img_size: int) -> Any:
    from damo_plugins.data.coco import CocoDetection

    root = generated_data(cfg.images, cfg.seed) if cfg.data == "generated" else Path(cfg.data)
    images, annotations = root / cfg.split, root / f"{cfg.split}.json"
    if not annotations.is_file():
        raise DamoError(
            f"no annotations at {annotations}", "give data: DIR with DIR/val.json, or 'generated'"
        )
    return CocoDetection(images, annotations, img_size, augment=False)


def evaluate_artifact(
    artifact: ModelArtifact, dataset: Any, cfg: EvaluateConfig, manager: Any = None
) -> dict[str, float]:
    """mAP of a torch/ONNX/OpenVINO detector artifact (one image per inference)."""
    import torch

    from damo_plugins.data.evaluate import coco_map, postprocess, split_outputs, to_coco_detections

    n = len(dataset) if cfg.limit is None else min(cfg.limit, len(dataset))
    dets: list[dict[str, Any]] = []
    ids: list[int] = []
    for i in range(n):
        image, _, info = dataset[i]
        outs = artifact.run([image[None].numpy().astype(np.float32)], manager)
        scores, boxes = split_outputs([torch.from_numpy(np.asarray(o)) for o in outs])
        res = postprocess(scores, boxes, conf=cfg.conf, iou=cfg.iou)
        dets += to_coco_detections(res, [info], dataset.cat_ids)
        ids.append(int(info["image_id"]))
    return coco_map(dataset.annotations, dets, image_ids=ids)


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
