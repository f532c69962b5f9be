"""``quantize``: INT8 post-training quantization through a backend adapter, checked against FP32.

The work is done by the adapters (``nncf``, ``inc``, ``onnxruntime``), each with its own
quantizer; this plugin validates the step, prepares the data (calibration, accuracy-control
and held-out sets), keeps the detector decode in floating point (:mod:`damo_plugins.lib.decode`)
and verifies the result (:mod:`damo_plugins.lib.fidelity`; COCO mAP with labelled data,
:mod:`damo_plugins.data.validation`). It also provides ``damo-opt quantize``.

Options: :class:`QuantizeConfig` holds what every quantizer takes; the rest of the step's keys
are the chosen adapter's own (``Adapter.options["quantize"]``, e.g. NNCF's ``preset``),
checked against its schema when the recipe is validated — the recipe stays flat
(``quantize: {adapter: nncf, preset: mixed}``) and ``preset`` given to ONNX Runtime is an
error naming the adapter it belongs to.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from damo_plugins.core.adapter import adapter_options
from damo_plugins.core.errors import DamoError
from damo_plugins.core.hookspecs import hookimpl
from damo_plugins.core.passes import Pass, PassConfig, PassContext
from damo_plugins.core.verify import Verification

if TYPE_CHECKING:  # pragma: no cover
    from damo_plugins.core.artifact import ModelArtifact
    from damo_plugins.core.manager import PluginManager
    from damo_plugins.data.validation import LabelledDetections

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
    """What every quantizer takes; the adapter's own options are the extra keys.

    Extra keys are allowed here only because :meth:`QuantizePass.validate_config` checks them
    against the adapter's schema (and fills its defaults); ``run`` checks them again, so a
    config built by hand cannot smuggle an option past the adapter either.
    """

    model_config = ConfigDict(extra="allow")

    adapter: str = Field("nncf", description="nncf | inc | onnxruntime (or a third-party adapter)")
    target: Literal["openvino", "onnx"] | None = Field(
        None, description="output format (default per adapter)"
    )
    calibration: Any = Field(
        "generated",
        description="{images: DIR, size: N} | {numpy: FILE} | {generated: N} | path",
        json_schema_extra={"path": "data"},  # relative to the recipe; keywords stay
    )
    subset_size: int = Field(300, ge=1, description="calibration samples to use")
    mode: Literal["int8", "weights"] = Field(
        "int8", description="int8: weights+activations; weights: weight-only (NNCF)"
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
        json_schema_extra={"path": "data"},  # relative to the recipe; keywords stay
    )
    val_size: int | None = Field(
        None, ge=1, description="validation samples for accuracy control (default: all of val)"
    )
    fuse: bool = Field(
        True,
        description="fuse RepConv branches and Conv+BN of a PyTorch model before quantizing "
        "(the deployed graph is what should be quantized)",
    )
    accept_fp_result: bool = Field(
        False,
        description="accept a result in which accuracy control reverted every quantizer; "
        "the report then calls it FP32, never INT8",
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

    @classmethod
    def validate_config(
        cls, options: Mapping[str, Any], manager: PluginManager | None = None
    ) -> QuantizeConfig:
        """Generic keys by :class:`QuantizeConfig`, the others by the adapter's schema.

        The adapter's defaults are filled in, so the report records every option it ran with.
        """
        fields = QuantizeConfig.model_fields
        generic = {str(k): v for k, v in options.items() if str(k) in fields}
        own = {str(k): v for k, v in options.items() if str(k) not in fields}
        cfg = QuantizeConfig(**generic)
        _, opts = adapter_options(manager, cfg.adapter, "quantize", own, also=list(fields))
        return QuantizeConfig(**generic, **opts.model_dump())

    def _held_out(
        self, artifact: ModelArtifact, ctx: PassContext, calib: Any = None
    ) -> tuple[Any, str]:
        """The held-out set INT8 is compared on, and a description of where it came from.

        A pure function of the configuration, the input model and ``ctx.seed``: ``run`` (for
        accuracy control) and ``verify`` each call it and get the same samples, so the pass
        keeps no state between them. Labelled data of a model that is not a detector comes
        back as its plain images (see :meth:`_check_labelled`).
        """
        from damo_plugins.data.calibration import generated_images, resolve_calibration
        from damo_plugins.data.validation import labelled_validation

        cfg: QuantizeConfig = self.config  # type: ignore[assignment]
        shape = artifact.inputs[0].concrete() if artifact.inputs else None
        labelled = (
            labelled_validation(cfg.val, shape, cfg.val_size) if cfg.val is not None else None
        )
        if labelled is not None:
            origin = f"labelled validation data {labelled.source}"
            return self._check_labelled(labelled, artifact, ctx), origin
        if cfg.val is not None:
            held = resolve_calibration(cfg.val, shape, ctx.manager, seed=ctx.seed + 1)
            return held, "validation data"
        if calib is None:
            calib = resolve_calibration(cfg.calibration, shape, ctx.manager, seed=ctx.seed)
        used = min(len(calib), cfg.subset_size)
        if len(calib) > used:
            held = calib.subset(used, used + cfg.holdout)
            return held, "calibration samples not used for calibration"
        held = generated_images(cfg.holdout, input_shape=shape, seed=ctx.seed + 10_000)
        return held, "generated images (the calibration set had no spare samples)"

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        from damo_plugins.data.calibration import resolve_calibration
        from damo_plugins.data.validation import LabelledDetections
        from damo_plugins.lib.fidelity import quantized_ops

        cfg: QuantizeConfig = self.config  # type: ignore[assignment]
        if not artifact.inputs:
            raise DamoError(
                "cannot quantize: the model's input shape is unknown",
                "give input_shape / --input-shape",
            )
        # Checked again here: a QuantizeConfig built by hand has not been through validate_config.
        adapter, opts = adapter_options(
            ctx.manager,
            cfg.adapter,
            "quantize",
            cfg.model_extra or {},
            also=list(QuantizeConfig.model_fields),
        )
        if cfg.fuse and artifact.format == "torch":
            artifact = _fused(artifact, ctx)
        shape = artifact.inputs[0].concrete()
        full = resolve_calibration(cfg.calibration, shape, ctx.manager, seed=ctx.seed)
        calib = full.subset(0, cfg.subset_size)
        if calib.name.startswith("generated"):
            ctx.log(
                "  note: calibrating on generated images — fine for a smoke run, not for deployment"
            )
        target = self.output_format(cfg, artifact.format)
        validation = None
        if cfg.max_drop is not None:
            held, _ = self._held_out(artifact, ctx, full)
            if isinstance(held, LabelledDetections):
                validation = held
                ctx.log(
                    f"  accuracy control: mAP@[.5:.95] on {held.source}, max drop {cfg.max_drop}"
                )
            else:
                validation = (
                    held.subset(0, cfg.val_size) if cfg.val is not None and cfg.val_size else held
                )
                ctx.log(
                    f"  accuracy control: agreement with FP32 (no labels) on {len(validation)} "
                    f"control-set inputs, max drop {cfg.max_drop}"
                )
        ctx.log(f"  quantizing with {cfg.adapter} -> {target} on {len(calib)} calibration samples")
        out = adapter.quantize(
            artifact,
            calib,
            target=target,
            mode=cfg.mode,
            subset_size=cfg.subset_size,
            keep_head_fp=cfg.keep_head_fp,
            ignored_scope=cfg.ignored_scope.model_dump() if cfg.ignored_scope else None,
            max_drop=cfg.max_drop,
            validation=validation,
            seed=ctx.seed,
            **opts.model_dump(),
        )
        counts = quantized_ops(out)
        info = dict(out.meta.get("quantization", {}))
        info.update(counts)
        reverted = counts["quantized_ops"] == 0
        info["precision"] = "fp32 (quantization reverted)" if reverted else cfg.mode
        out.meta["quantization"] = info
        out.meta["precision"] = "fp32" if reverted else cfg.mode
        ctx.extra["quantization"] = info
        if reverted:
            why = (
                f"accuracy control (max_drop {cfg.max_drop}) reverted every quantizer"
                if cfg.max_drop is not None
                else "the backend quantized nothing"
            )
            msg = (
                f"quantization left no operation quantized ({counts['quantizable_ops']} "
                f"convolutions/matmuls, 0 quantized): {why}; the result is an FP32 model"
            )
            if not cfg.accept_fp_result:
                raise DamoError(
                    msg,
                    "relax max_drop, calibrate on more representative data, or set "
                    "accept_fp_result: true to keep the FP32 result (it is never called INT8)",
                )
            ctx.log(f"  note: {msg} (accepted: accept_fp_result)")
        else:
            ctx.log(
                f"  {counts['quantized_ops']} quantize operations in the result "
                f"({counts['quantizable_ops']} convolutions/matmuls)"
            )
        return out

    @staticmethod
    def _check_labelled(held: LabelledDetections, artifact: ModelArtifact, ctx: PassContext) -> Any:
        """Labelled data for a detector; for any other model, just its images (with a note)."""
        import numpy as np

        from damo_plugins.lib.fidelity import detector_outputs, runner

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
        from damo_plugins.data.validation import LabelledDetections
        from damo_plugins.lib.fidelity import as_feeds, compare_int8, runner

        cfg: QuantizeConfig = self.config  # type: ignore[assignment]
        held, origin = self._held_out(before, ctx)
        run_ref, run_q = runner(before, ctx.manager), runner(after, ctx.manager)
        refs, outs = [], []
        for item in held:
            feeds = as_feeds(item)
            refs.append(run_ref(feeds))
            outs.append(run_q(feeds))
        names = [t.name for t in after.outputs]
        m = compare_int8(refs, outs, names)
        # With accuracy control on validation data, these are the images its decisions used:
        # call them the control set, never held out.
        control = cfg.max_drop is not None and cfg.val is not None
        kind = "control-set" if control else "held-out"
        m.update(compared_on=kind, data=origin, min_cosine=cfg.min_cosine)
        precision = after.meta.get("precision", cfg.mode)
        label = "INT8" if precision == "int8" else str(precision).upper()
        ok = m["cosine_min"] is not None and m["cosine_min"] >= cfg.min_cosine
        msg = f"{label} vs FP32 on {m['samples']} {kind} inputs: cosine min {m['cosine_min']:.4f} (>= {cfg.min_cosine})"
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


def _fused(artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
    """The deployed form of a training-time model: RepConv branches and Conv+BN fused.

    Quantizing the multi-branch graph quantizes ~30 % more convolutions than will ever run
    (110 instead of 83 on DAMO-YOLO-S) and each branch's ranges separately; fusion is exact
    (the reparam step's check), so it comes first unless ``fuse: false``.
    """
    from damo_plugins.lib.reparam import reparameterize

    fused, rep = reparameterize(artifact.model)
    changed = rep.repconv_deployed + rep.branch_sums_fused + rep.conv_bn_folded
    if not changed:
        return artifact
    ctx.log(
        f"  fusing before quantizing: {rep.repconv_deployed} RepConv(s) deployed, "
        f"{rep.branch_sums_fused} branch sum(s) merged, {rep.conv_bn_folded} Conv+BN folded "
        "(fuse: false / --no-fuse keeps the branches)"
    )
    ctx.extra["fused_before_quantize"] = rep.as_dict()
    return artifact.derive(model=fused)


@hookimpl
def damo_passes() -> list[type[Pass]]:
    return [QuantizePass]


# ----------------------------------------------------------------------------------- CLI
def cmd_quantize(args: argparse.Namespace) -> int:
    from damo_plugins.core.manager import get_manager
    from damo_plugins.core.pipeline import run
    from damo_plugins.core.verbs import log as _log
    from damo_plugins.core.verbs import parse_model_args

    step: dict[str, Any] = {
        "adapter": args.adapter,
        "calibration": _data_option(args.calib, "calibration"),
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
        step["val"] = _data_option(args.val, "val")
    if args.mode != "int8":
        step["mode"] = args.mode
    if args.no_keep_head:
        step["keep_head_fp"] = False
    if args.val_size is not None:
        step["val_size"] = args.val_size
    if args.no_fuse:
        step["fuse"] = False
    if args.accept_fp_result:
        step["accept_fp_result"] = True
    model: str = args.model
    if Path(model).exists():
        model = str(Path(model).resolve())
    recipe: dict[str, Any] = {
        "model": model,
        "steps": [{"quantize": step}],
        "model_args": parse_model_args(args.model_arg),
    }
    if args.input_shape:
        recipe["input_shape"] = args.input_shape
    if args.arch:
        recipe["arch"] = args.arch
    from damo_plugins.core.verbs import errors_as_flags, print_json, run_result_json

    with errors_as_flags(FLAGS):
        # flat: the model files and the report side by side in -o, no 01-quantize/
        res = run(
            recipe,
            manager=get_manager(),
            output=args.output,
            verify=not args.no_verify,
            force=args.force,
            log=_log,
            flat=True,
        )
    if args.json:
        print_json(run_result_json(res))
        return 0
    print(f"report: {res.output / 'report.md'}")
    print(f"model:  {res.artifact.path}")
    return 0


def _data_option(value: Any, role: str) -> Any:
    """``--calib DATA`` / ``--val DATA`` read as ``--data`` is everywhere else.

    A data set (COCO layout, the project layout, a dataset YAML, a COCO json) is resolved by
    :func:`damo_plugins.data.sources.resolve`: calibration takes the train images (val when
    there is no train split), validation the labelled val split. Anything else (an image
    folder, ``.npy``, ``generated``) is passed on as the step option it always was.
    """
    path = Path(str(value))
    if not (path.is_dir() or path.suffix.lower() in (".yaml", ".yml", ".json")):
        return value
    from damo_plugins.data.sources import resolve

    try:
        source = resolve(str(path))
    except DamoError:  # not a data set: the step reports what is wrong with the option
        return value
    split = source.val if role == "val" else (source.train or source.val)
    if split is None:  # a plain image folder
        return value
    if role == "val":
        return {"coco": str(split.annotations.resolve()), "images": str(split.images.resolve())}
    return {"images": str(split.images.resolve())}


#: recipe key of the quantize step -> the flag a user of ``damo-opt quantize`` typed
FLAGS = {
    "adapter": "--adapter",
    "calibration": "--calib",
    "subset_size": "--subset",
    "target": "--target",
    "max_drop": "--max-drop",
    "val": "--val",
    "val_size": "--val-size",
    "mode": "--mode",
    "keep_head_fp": "--no-keep-head",
    "fuse": "--no-fuse",
    "accept_fp_result": "--accept-fp-result",
}


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
    p.add_argument(
        "--val-size",
        type=int,
        metavar="N",
        help="use only the first N --val images for accuracy control (default: all)",
    )
    p.add_argument(
        "--no-fuse",
        action="store_true",
        help="quantize a training-time model as it is (default: fuse RepConv/Conv+BN first)",
    )
    p.add_argument(
        "--accept-fp-result",
        action="store_true",
        help="keep the result even if accuracy control reverted every quantizer (reported FP32)",
    )
    p.add_argument(
        "-o", "--output", required=True, help="output folder: the model files and the report"
    )
    p.add_argument("--no-verify", action="store_true", help="skip the INT8-vs-FP32 check")
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_quantize)
