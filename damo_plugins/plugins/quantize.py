"""``quantize``: INT8 post-training quantization through a backend adapter, checked against FP32.

The work is done by the adapters (``nncf``, ``inc``, ``onnxruntime``), each with its own
quantizer; this plugin validates the step, prepares the data (calibration, accuracy-control
and held-out sets), keeps the detector decode in floating point (:mod:`damo_plugins.lib.decode`)
and verifies the result (:mod:`damo_plugins.lib.fidelity`; COCO mAP with labelled data,
:mod:`damo_plugins.data.validation`). It also provides ``damo-opt quantize``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from damo_plugins.core.errors import DamoError
from damo_plugins.core.hookspecs import hookimpl
from damo_plugins.core.passes import Pass, PassConfig, PassContext
from damo_plugins.core.verify import Verification
from damo_plugins.data.validation import LabelledDetections, labelled_validation
from damo_plugins.lib.fidelity import as_feeds, compare_int8, detector_outputs, runner

if TYPE_CHECKING:  # pragma: no cover
    from damo_plugins.core.artifact import ModelArtifact

#: default target format per adapter (where its INT8 model runs fastest here)
DEFAULT_TARGET = {"nncf": "openvino", "inc": "openvino", "onnxruntime": "onnx"}


class IgnoredScope(BaseModel):
    """What to keep in floating point besides (or, with keep_head_fp false, instead of) the head."""

    model_config = ConfigDict(extra="forbid")
    names: list[str] = Field(default_factory=list, description="node names (ONNX/OpenVINO)")
    types: list[str] = Field(default_factory=list, description="op types, e.g. Softmax")
    patterns: list[str] = Field(
        default_factory=list, description="regular expressions on node names"
    )


class QuantizeConfig(PassConfig):
    adapter: str = Field("nncf", description="nncf | inc | onnxruntime (or a third-party adapter)")
    target: Literal["openvino", "onnx"] | None = Field(
        None, description="output format (default per adapter)"
    )
    calibration: Any = Field(
        "generated", description="{images: DIR, size: N} | {numpy: FILE} | {generated: N} | path"
    )
    subset_size: int = Field(300, ge=1, description="calibration samples to use")
    mode: Literal["int8", "weights"] = Field(
        "int8", description="int8: weights+activations; weights: weight-only (NNCF)"
    )
    preset: Literal["performance", "mixed"] = "performance"
    fast_bias_correction: bool = True
    target_device: Literal["ANY", "CPU", "GPU", "NPU", "CPU_SPR"] = Field(
        "ANY", description="NNCF target device"
    )
    per_channel: bool = Field(True, description="per-channel weight scales (ONNX Runtime)")
    calibrate_method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="ONNX Runtime"
    )
    keep_head_fp: bool = Field(
        True, description="keep the detector decode sub-graph in floating point"
    )
    ignored_scope: IgnoredScope | None = None
    max_drop: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="accuracy control: largest allowed drop (absolute mAP with labelled val)",
    )
    val: Any = Field(
        None,
        description="validation data for max_drop and the INT8 check: labelled (DIR with "
        "val/ + val.json, a COCO .json, {coco: ...}) -> mAP; images/.npy/generated -> "
        "agreement with FP32",
    )
    val_size: int = Field(16, ge=1, description="validation samples for accuracy control")
    torch_backend: bool = Field(
        False,
        description="NNCF: quantize the nn.Module on NNCF's torch path (builds a C++ "
        "extension on first use), then convert to OpenVINO",
    )
    holdout: int = Field(8, ge=1, description="held-out samples compared INT8 vs FP32")
    min_cosine: float = Field(
        0.97, ge=0, le=1, description="verify: lowest output cosine similarity"
    )
    min_agreement: float = Field(
        0.5, ge=0, le=1, description="verify: lowest top-detection agreement"
    )


class QuantizePass(Pass):
    """INT8 quantization through an adapter; verified by cosine and top-detection agreement."""

    name = "quantize"
    accepts = ("torch", "onnx", "openvino")
    produces = None
    Config = QuantizeConfig
    description = "INT8 post-training quantization (NNCF / INC / ONNX Runtime), head kept in FP"

    @classmethod
    def output_format(cls, config: PassConfig, input_format: str) -> str:
        cfg: QuantizeConfig = config  # type: ignore[assignment]
        return cfg.target or DEFAULT_TARGET.get(cfg.adapter, input_format)

    def _data(self, artifact: ModelArtifact, ctx: PassContext) -> tuple[Any, Any, str]:
        """Calibration subset, held-out set and a description of where the held-out came from."""
        from damo_plugins.data.calibration import generated_images, resolve_calibration

        cfg: QuantizeConfig = self.config  # type: ignore[assignment]
        shape = artifact.inputs[0].concrete() if artifact.inputs else None
        calib = resolve_calibration(cfg.calibration, shape, ctx.manager, seed=ctx.seed)
        used = calib.subset(0, cfg.subset_size)
        labelled = (
            labelled_validation(cfg.val, shape, cfg.val_size) if cfg.val is not None else None
        )
        if labelled is not None:
            held = labelled
            origin = f"labelled validation data {labelled.source}"
        elif cfg.val is not None:
            held = resolve_calibration(cfg.val, shape, ctx.manager, seed=ctx.seed + 1)
            origin = "validation data"
        elif len(calib) > len(used):
            held = calib.subset(len(used), len(used) + cfg.holdout)
            origin = "calibration samples not used for calibration"
        else:
            held = generated_images(cfg.holdout, input_shape=shape, seed=ctx.seed + 10_000)
            origin = "generated images (the calibration set had no spare samples)"
        return used, held, origin

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        cfg: QuantizeConfig = self.config  # type: ignore[assignment]
        if not artifact.inputs:
            raise DamoError(
                "cannot quantize: the model's input shape is unknown",
                "give input_shape / --input-shape",
            )
        adapter = ctx.manager.get_adapter(cfg.adapter)
        calib, held, origin = self._data(artifact, ctx)
        if calib.name.startswith("generated"):
            ctx.log(
                "  note: calibrating on generated images — fine for a smoke run, not for deployment"
            )
        options = cfg.model_dump(
            exclude={"adapter", "calibration", "val", "holdout", "min_cosine", "min_agreement"}
        )
        options["target"] = self.output_format(cfg, artifact.format)
        options["ignored_scope"] = cfg.ignored_scope.model_dump() if cfg.ignored_scope else None
        if isinstance(held, LabelledDetections):
            held = self._check_labelled(held, artifact, ctx)
        validation = None
        if cfg.max_drop is not None:
            if isinstance(held, LabelledDetections):
                validation = held
                ctx.log(
                    f"  accuracy control: mAP@[.5:.95] on {held.source}, max drop {cfg.max_drop}"
                )
            else:
                validation = held.subset(0, cfg.val_size) if cfg.val is not None else held
                ctx.log(
                    f"  accuracy control: agreement with FP32 (no labels), max drop {cfg.max_drop}"
                )
        ctx.log(
            f"  quantizing with {cfg.adapter} -> {options['target']} on {len(calib)} calibration samples"
        )
        out = adapter.quantize(artifact, calib, validation=validation, seed=ctx.seed, **options)
        ctx.extra["quantization"] = dict(out.meta.get("quantization", {}))
        self._held = held
        self._origin = origin
        return out

    @staticmethod
    def _check_labelled(held: LabelledDetections, artifact: ModelArtifact, ctx: PassContext) -> Any:
        """Labelled data for a detector; for any other model, just its images (with a note)."""
        outputs = runner(artifact, ctx.manager)([held[0]])
        if detector_outputs([np.asarray(o) for o in outputs]) is None:
            ctx.log(
                "  note: the model is not a detector (no scores/boxes outputs): its labelled "
                "validation images are used unlabelled, scored by agreement with FP32"
            )
            from damo_plugins.data.calibration import CalibrationSet

            return CalibrationSet(f"images of {held.source}", len(held), held.images.__getitem__)
        held.check_outputs(outputs)
        return held

    def verify(self, before: ModelArtifact, after: ModelArtifact, ctx: PassContext) -> Verification:
        cfg: QuantizeConfig = self.config  # type: ignore[assignment]
        held = getattr(self, "_held", None)
        origin = getattr(self, "_origin", "")
        if held is None:
            _, held, origin = self._data(before, ctx)
        run_ref, run_q = runner(before, ctx.manager), runner(after, ctx.manager)
        refs, outs = [], []
        for item in held:
            feeds = as_feeds(item)
            refs.append(run_ref(feeds))
            outs.append(run_q(feeds))
        names = [t.name for t in after.outputs]
        m = compare_int8(refs, outs, names)
        m.update(held_out=origin, min_cosine=cfg.min_cosine)
        ok = m["cosine_min"] is not None and m["cosine_min"] >= cfg.min_cosine
        msg = f"INT8 vs FP32 on {m['samples']} held-out inputs: cosine min {m['cosine_min']:.4f} (>= {cfg.min_cosine})"
        if m["detector"]:
            m["min_agreement"] = cfg.min_agreement
            ok = ok and m["top_detection_agreement"] >= cfg.min_agreement
            msg += f", top-detection agreement {m['top_detection_agreement']:.2f} (>= {cfg.min_agreement})"
        if isinstance(held, LabelledDetections) and m["detector"]:
            # mAP of the deployed models themselves (the adapter measured in its own runtime).
            fp32, int8 = held.score_outputs(refs), held.score_outputs(outs)
            m.update(
                mAP_fp32=round(fp32, 4), mAP_int8=round(int8, 4), mAP_drop=round(fp32 - int8, 4)
            )
            msg += f", mAP@[.5:.95] {fp32:.4f} -> {int8:.4f}"
            if cfg.max_drop is not None:
                ok = ok and fp32 - int8 <= cfg.max_drop
                msg += f" (drop {fp32 - int8:.4f} <= {cfg.max_drop})"
        ctx.extra.setdefault("int8_vs_fp32", m)
        return Verification(ok, m, msg)


@hookimpl
def damo_passes() -> list[type[Pass]]:
    return [QuantizePass]


# ----------------------------------------------------------------------------------- CLI
def cmd_quantize(args: argparse.Namespace) -> int:
    from damo_plugins.core.manager import get_manager
    from damo_plugins.core.pipeline import run
    from damo_plugins.core.verbs import log as _log

    step: dict[str, Any] = {
        "adapter": args.adapter,
        "calibration": args.calib,
        "subset_size": args.subset,
    }
    if args.target:
        step["target"] = args.target
    if args.max_drop is not None:
        if args.val is None:
            raise DamoError(
                "--max-drop needs --val SRC (validation data)",
                "e.g. --val DATA (DATA/val/ + DATA/val.json: mAP) or --val images/ (agreement with FP32)",
            )
        step["max_drop"] = args.max_drop
    if args.val is not None:
        step["val"] = args.val
    if args.mode != "int8":
        step["mode"] = args.mode
    if args.no_keep_head:
        step["keep_head_fp"] = False
    model: str = args.model
    if Path(model).exists():
        model = str(Path(model).resolve())
    kwargs: dict[str, Any] = {}
    for item in args.model_arg:
        key, _, value = item.partition("=")
        if not _:
            raise DamoError(f"--model-arg '{item}' is not KEY=VALUE")
        import json

        try:
            kwargs[key] = json.loads(value)
        except ValueError:
            kwargs[key] = value
    recipe: dict[str, Any] = {"model": model, "steps": [{"quantize": step}], "model_args": kwargs}
    if args.input_shape:
        recipe["input_shape"] = args.input_shape
    if args.arch:
        recipe["arch"] = args.arch
    res = run(
        recipe,
        manager=get_manager(),
        output=args.output,
        verify=not args.no_verify,
        force=args.force,
        log=_log,
    )
    print(f"report: {res.output / 'report.md'}")
    print(f"model:  {res.artifact.path}")
    return 0


@hookimpl
def damo_cli(subparsers: argparse._SubParsersAction) -> None:
    from damo_plugins.core.verbs import add_model_args

    p = subparsers.add_parser("quantize", help="INT8 post-training quantization through an adapter")
    add_model_args(p)
    p.add_argument("--adapter", default="nncf", help="nncf | inc | onnxruntime (default nncf)")
    p.add_argument(
        "--target", choices=("openvino", "onnx"), help="output format (default: per adapter)"
    )
    p.add_argument(
        "--calib",
        required=True,
        metavar="SRC",
        help="calibration data: an image folder, a .npy/.npz file, or generated[:N] (smoke runs)",
    )
    p.add_argument(
        "--subset", type=int, default=300, metavar="N", help="calibration samples to use"
    )
    p.add_argument(
        "--mode", choices=("int8", "weights"), default="int8", help="weights: weight-only (NNCF)"
    )
    p.add_argument(
        "--max-drop",
        type=float,
        help="accuracy control: largest allowed drop (needs --val); absolute mAP@[.5:.95] "
        "with labelled --val, else agreement with FP32",
    )
    p.add_argument(
        "--val",
        metavar="SRC",
        help="validation data: a labelled COCO folder (DIR/val/ + DIR/val.json) or COCO .json "
        "-> mAP; or images/.npy/.npz/generated (as --calib) -> agreement with FP32",
    )
    p.add_argument(
        "--no-keep-head", action="store_true", help="quantize the detector decode too (not advised)"
    )
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--no-verify", action="store_true", help="skip the INT8-vs-FP32 check")
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    p.set_defaults(func=cmd_quantize)
