"""``distill``: feature distillation from a frozen teacher as a recipe step (the method: :mod:`damo_plugins.train.distill`)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from damo_plugins.core.artifact import ModelArtifact
from damo_plugins.core.errors import DamoError
from damo_plugins.core.hookspecs import hookimpl
from damo_plugins.core.passes import Pass, PassConfig, PassContext
from damo_plugins.core.verify import Verification


class DistillConfig(PassConfig):
    teacher: str = Field(
        ...,
        description="teacher: a registered model or a .pt checkpoint",
        json_schema_extra={"path": "model"},  # a file is relative to the recipe
    )
    teacher_args: dict[str, Any] = Field(
        default_factory=dict, description="builder arguments of the teacher"
    )
    loss: Literal["cwd", "mse"] = "cwd"
    tau: float = Field(1.0, gt=0)
    weight_start: float = Field(1.0, ge=0)
    weight_end: float = Field(0.1, ge=0)
    data: str = Field(
        ...,
        description="data folder (train/ + train.json, val/ + val.json)",
        json_schema_extra={"path": "data"},  # relative to the recipe
    )
    epochs: int = Field(5, ge=1)
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    img_size: int | None = None
    eval_limit: int | None = Field(None, ge=1)
    baseline: bool = Field(False, description="also train the student alone and report the gain")


class DistillPass(Pass):
    """Feature distillation (CWD or MSE on the neck outputs) from a frozen teacher."""

    name = "distill"
    accepts = ("torch",)
    Config = DistillConfig
    description = "train with DAMO-YOLO feature distillation (CWD) from a frozen teacher"

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        from damo_plugins.core.artifact import load_model
        from damo_plugins.data.evaluate import evaluate
        from damo_plugins.train.distill import distill
        from damo_plugins.train.loop import TrainConfig, fit
        from damo_plugins.train.trainer import data_splits

        cfg: DistillConfig = self.config  # type: ignore[assignment]
        if not artifact.inputs:
            raise DamoError(
                "distill needs the model's input shape", "give input_shape / --input-shape"
            )
        size = cfg.img_size or int(artifact.inputs[0].concrete()[-1])
        train_set, val_set = data_splits(Path(cfg.data), size, seed=ctx.seed)
        teacher = load_model(cfg.teacher, manager=ctx.manager, model_args=cfg.teacher_args).model
        tcfg = TrainConfig(
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            seed=ctx.seed,
            eval_every=10**6,
            eval_limit=cfg.eval_limit,
        )
        metrics: dict[str, Any] = {
            "teacher_mAP": round(evaluate(teacher, val_set, limit=cfg.eval_limit)["mAP"], 4)
        }
        start = copy.deepcopy(artifact.model)
        student = copy.deepcopy(start)
        log = lambda s: ctx.log(f"  distill: {s}")  # noqa: E731
        trained, _, res = distill(
            student,
            teacher,
            train_set,
            tcfg,
            loss=cfg.loss,
            tau=cfg.tau,
            weight=(cfg.weight_start, cfg.weight_end),
            log=log,
        )
        metrics["mAP"] = round(evaluate(trained, val_set, limit=cfg.eval_limit)["mAP"], 4)
        metrics["seconds"] = round(res.seconds, 1)
        if cfg.baseline:
            alone = fit(
                copy.deepcopy(start), train_set, tcfg, log=lambda s: ctx.log(f"  baseline: {s}")
            )
            metrics["baseline_mAP"] = round(
                evaluate(alone.model, val_set, limit=cfg.eval_limit)["mAP"], 4
            )
            metrics["gain"] = round(metrics["mAP"] - metrics["baseline_mAP"], 4)
        ctx.extra.update(metrics)
        out = artifact.derive(model=trained.eval())
        out.meta["distill"] = metrics
        return out

    def verify(self, before: ModelArtifact, after: ModelArtifact, ctx: PassContext) -> Verification:
        """Training changes the numbers: check the student keeps its interface and is finite."""
        import torch

        feeds = before.example_inputs(seed=ctx.seed)
        ref, out = before.run(feeds, ctx.manager), after.run(feeds, ctx.manager)
        ok = [r.shape for r in ref] == [o.shape for o in out] and all(
            bool(torch.isfinite(torch.from_numpy(o)).all()) for o in out
        )
        meta = after.meta.get("distill", {})
        msg = f"student mAP {meta.get('mAP')} (teacher {meta.get('teacher_mAP')})"
        if "gain" in meta:
            msg += f", {meta['gain']:+.4f} vs the student trained alone"
        return Verification(ok, dict(meta), msg)


@hookimpl
def damo_passes() -> list[type[Pass]]:
    return [DistillPass]
