"""The candidate space of ``optimize``: which chains of passes to try, and how to measure them.

Kept small by default because every candidate costs minutes of CPU on a small machine:
fuse (when it changes the model) -> export -> INT8 through each installed quantizing adapter
(NNCF, ONNX Runtime; INC only when asked: its PT2E path is the slowest here) -> runtime and
precision (OpenVINO f32, OpenVINO bf16 when the device has it, ONNX Runtime). Pruning is
opt-in (``prune: [0.3]``: fractions of prunable channels, each fine-tuned on the train split
when there is one) because its fine-tuning dominates the wall time.

A space file is YAML or JSON with these keys; unknown keys are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from damo_plugins.core.errors import DamoError

QUANTIZERS = ("nncf", "onnxruntime", "inc")
RUNTIME_CHOICES = ("openvino-f32", "openvino-bf16", "openvino-f16", "onnxruntime")


class Space(BaseModel):
    """What ``optimize`` explores (every field has a small default)."""

    model_config = ConfigDict(extra="forbid")

    fuse: bool = Field(True, description="re-parameterize / fold BN (when it changes the model)")
    prune: list[float] = Field(
        default_factory=list, description="channel fractions to prune (each a candidate branch)"
    )
    prune_steps: int = Field(1, ge=1, le=20, description="iterative pruning steps per fraction")
    prune_importance: Literal["auto", "l1", "l2", "bn", "taylor"] = Field(
        "auto", description="channel importance (auto: Taylor with fine-tuning data, else BN)"
    )
    prune_scope: Literal["global", "uniform"] = Field(
        "global", description="rank channels across layers (global) or per layer"
    )
    finetune_epochs: int = Field(1, ge=0, description="fine-tuning epochs after pruning")
    finetune_images: int | None = Field(
        None, ge=1, description="train images to fine-tune on (default: all)"
    )
    quantizers: list[str] | None = Field(
        None, description="INT8 adapters (default: the installed ones of nncf, onnxruntime)"
    )
    accuracy_control: bool = Field(
        True, description="retry INT8 with accuracy control when plain INT8 misses the budget"
    )
    runtimes: list[str] = Field(
        default_factory=lambda: ["openvino-f32", "openvino-bf16", "onnxruntime"],
        description="runtime-precision pairs to deploy on",
    )
    calibration: int = Field(64, ge=1, description="calibration images (from train)")
    control: int | None = Field(100, ge=1, description="control images (decisions), from val")
    held_out: int | None = Field(100, ge=1, description="held-out images (reported), from val")
    rounds: int = Field(5, ge=1, description="interleaved latency rounds per candidate")
    slot_seconds: float = Field(0.25, gt=0, description="timing per variant per round")
    task_cpus: float | None = Field(
        None,
        gt=0,
        description="CPUs (and torch threads) per build/evaluation task (default: all of them "
        "in this process, 1 in worker processes or on Ray)",
    )
    task_memory_gb: float | None = Field(
        2.0,
        gt=0,
        description="memory a Ray task asks for (pruning with fine-tuning: twice); Ray places "
        "tasks so they fit",
    )

    def checked(self) -> Space:
        bad = [q for q in self.quantizers or [] if q not in QUANTIZERS]
        if bad:
            raise DamoError(f"space: unknown quantizer(s) {bad}", f"one of {', '.join(QUANTIZERS)}")
        bad = [r for r in self.runtimes if r not in RUNTIME_CHOICES]
        if bad:
            raise DamoError(
                f"space: unknown runtime(s) {bad}", f"one of {', '.join(RUNTIME_CHOICES)}"
            )
        if any(not 0 < r < 1 for r in self.prune):
            raise DamoError("space: prune fractions must be between 0 and 1")
        return self


def load_space(spec: str | Path | dict[str, Any] | Space | None, **overrides: Any) -> Space:
    """A :class:`Space` from a YAML/JSON file, a mapping, or the defaults; then ``overrides``."""
    if isinstance(spec, Space):
        data = spec.model_dump()
    elif spec is None:
        data = {}
    elif isinstance(spec, dict):
        data = dict(spec)
    else:
        path = Path(spec)
        try:
            text = path.read_text()
        except OSError as exc:
            raise DamoError(f"cannot read space file {path}: {exc.strerror or exc}") from None
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text) or {}
        except ValueError as exc:
            raise DamoError(f"space file {path} is not valid: {str(exc).splitlines()[0]}") from None
        except Exception as exc:  # yaml.YAMLError
            raise DamoError(
                f"space file {path} is not valid YAML: {str(exc).splitlines()[0]}"
            ) from None
        if not isinstance(data, dict):
            raise DamoError(f"space file {path} must hold a mapping of options")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Space(**data).checked()
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(k) for k in err.get("loc", ()))
        raise DamoError(f"space: {key}: {err.get('msg', 'invalid value')}") from None
