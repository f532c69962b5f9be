"""``benchmark``: measure a model on a backend (latency and throughput) as a recipe step.

The measuring belongs to the adapters (OpenVINO, ONNX Runtime), with the statistics of
:mod:`damo_plugins.lib.timing`; this plugin makes benchmarking a step and a command. Latency
runs requests one at a time (``benchmark_app``'s method) and reports milliseconds per batch;
throughput keeps several requests in flight under the device's throughput mode and reports
images per second (batches per second times the batch).

``damo-opt bench`` measures both by default (``--hint`` picks one); a recipe step measures
the adapter's ``hint`` (latency by default), or both with ``both: true``.

The shape measured is resolved here, once, for every adapter (:func:`bench_shapes`): the
model's own static dimensions, overridden by ``input_shape``, ``batch`` and ``imgsz``; a
dynamic dimension (an export with ``--dynamic-batch`` or ``--dynamic``) takes the given
value, batch 1 when none is given, or the shape the model file records
(:func:`recorded_shape`). A dynamic height or width with none of these is one clear error
naming the flag, instead of the backend's "Batch size is zero" or "negative dimensions".

The step returns the model unchanged and puts the numbers in the report (``ctx.extra``);
its verification passes with the metrics attached.

Options: :class:`BenchmarkConfig` holds what every benchmark takes (device, how long to
measure, the shape); the rest are the adapter's own (``Adapter.options["benchmark"]``:
OpenVINO's ``hint``, ``precision``, ``threads``, ``requests``, ``streams``; ONNX Runtime's
``hint``, ``threads``, ``requests``, ``providers``), checked against its schema when the
recipe is validated.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict, Field, PositiveInt, ValidationError

from damo_plugins.core.adapter import adapter_options
from damo_plugins.core.errors import DamoError
from damo_plugins.core.hookspecs import hookimpl
from damo_plugins.core.passes import Pass, PassConfig, PassContext
from damo_plugins.core.verify import Verification
from damo_plugins.lib.timing import format_stats

if TYPE_CHECKING:  # pragma: no cover
    from damo_plugins.core.artifact import ModelArtifact
    from damo_plugins.core.manager import PluginManager


class BenchmarkConfig(PassConfig):
    """What every benchmark takes; the adapter's own options are the extra keys.

    Extra keys are allowed only because :meth:`BenchmarkPass.validate_config` checks them
    against the adapter's ``benchmark`` schema (and ``run`` checks them again).
    """

    model_config = ConfigDict(extra="allow")

    adapter: str = Field("openvino", description="openvino | onnxruntime")
    device: str = Field("CPU", description="device name (CPU, GPU, NPU, AUTO, ...)")
    iterations: int | None = Field(
        None, ge=1, description="measured runs (default: run for `seconds`)"
    )
    seconds: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="measuring time (default 5 s)"
    )
    warmup: int = Field(3, ge=0)
    batch: int | None = Field(
        None, ge=1, le=4096, description="batch to measure (default: the model's, or 1 if dynamic)"
    )
    imgsz: int | None = Field(
        None, ge=1, le=16384, description="square image size N: input [batch, C, N, N]"
    )
    input_shape: list[PositiveInt] | None = Field(
        None, min_length=1, description="the whole input shape, e.g. [1, 3, 640, 640]"
    )
    both: bool = Field(
        False,
        description="measure latency and throughput (the second under the adapter's "
        "throughput hint); `damo-opt bench` does unless --hint is given",
    )


#: the flag a user types for each shape option (errors name what the user can change)
SHAPE_FLAGS = {"batch": "--batch", "imgsz": "--imgsz", "input_shape": "--input-shape"}


def _static(d: Any) -> bool:
    return isinstance(d, int) and not isinstance(d, bool) and d > 0


def recorded_shape(artifact: ModelArtifact) -> list[int] | None:
    """The input shape a dynamic model records it was exported at, or ``None``.

    Looked up in ``artifact.meta["input_shape"]``, then in the model: ONNX
    ``metadata_props`` key ``damo_plugins.input_shape`` (a JSON list, written by
    :func:`damo_plugins.lib.onnx_export.export_onnx` for a dynamic export), which OpenVINO's
    conversion keeps in the IR's ``rt_info`` under ``framework``.
    """
    import json

    from damo_plugins.lib.onnx_export import INPUT_SHAPE_KEY as key

    candidates: list[Any] = [artifact.meta.get("input_shape")]
    model = artifact.model
    if artifact.format == "onnx":
        candidates += [p.value for p in getattr(model, "metadata_props", ()) if p.key == key]
    elif artifact.format == "openvino":
        with contextlib.suppress(Exception):  # an rt_info it cannot read is not a record
            for path in (["framework", key], [key]):
                if model.has_rt_info(path):
                    candidates.append(model.get_rt_info(path).astype(str))
    for value in candidates:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                continue
        if isinstance(value, list) and value and all(_static(d) for d in value):
            return [int(d) for d in value]
    return None


def bench_shapes(
    artifact: ModelArtifact,
    *,
    batch: int | None = None,
    imgsz: int | None = None,
    input_shape: list[int] | None = None,
) -> list[list[int]]:
    """The concrete shape of every input to measure at (see the module docstring).

    The flags apply to the first input (the image); other inputs must be static. Raises
    :class:`DamoError` naming the flag when a dimension stays unknown or a flag does not fit.
    """
    from damo_plugins.core.artifact import check_elements

    if not artifact.inputs:
        raise DamoError(
            "cannot benchmark: the model's input shape is unknown", "give --input-shape"
        )
    declared = list(artifact.inputs[0].shape)
    if input_shape is not None:
        if len(input_shape) != len(declared):
            raise DamoError(
                f"--input-shape {list(input_shape)} has {len(input_shape)} dimensions; the "
                f"model's input '{artifact.inputs[0].name}' has {len(declared)} {declared}"
            )
        shape: list[Any] = list(input_shape)
    else:
        shape = list(declared)
        if any(not _static(d) for d in shape[1:]):  # a dynamic H/W (or C): what was recorded?
            record = recorded_shape(artifact)
            if record is not None and len(record) == len(shape):
                shape = [d if _static(d) else r for d, r in zip(shape, record)]
    if imgsz is not None:
        if len(shape) != 4:
            raise DamoError(
                f"--imgsz needs an image input [N, C, H, W]; '{artifact.inputs[0].name}' is "
                f"{declared}",
                "give --input-shape instead",
            )
        shape[2] = shape[3] = imgsz
    if batch is not None:
        shape[0] = batch
    if shape and not _static(shape[0]):
        shape[0] = 1  # a dynamic batch is measured at batch 1 unless --batch says otherwise
    unknown = [i for i, d in enumerate(shape) if not _static(d)]
    if unknown:
        hint = (
            "give --imgsz N (input [batch, C, N, N]) or --input-shape"
            if len(shape) == 4 and set(unknown) <= {2, 3}
            else "give --input-shape with every dimension"
        )
        raise DamoError(
            f"cannot benchmark: input '{artifact.inputs[0].name}' {declared} is dynamic and "
            "no shape to measure at is given or recorded in the model",
            hint,
        )
    shapes = [[int(d) for d in shape]]
    for spec in artifact.inputs[1:]:
        if not all(_static(d) for d in spec.shape):
            raise DamoError(
                f"cannot benchmark: input '{spec.name}' {spec.shape} is dynamic",
                "the shape flags set the first input only; benchmark this model from Python "
                "with an artifact whose inputs are static",
            )
        shapes.append([int(d) for d in spec.shape])
    for spec, dims in zip(artifact.inputs, shapes):
        check_elements(dims, f"benchmark input '{spec.name}'")
    return shapes


class BenchmarkPass(Pass):
    """Measure latency and/or throughput; the model passes through unchanged."""

    name = "benchmark"
    accepts = ("torch", "onnx", "openvino")
    produces = None
    Config = BenchmarkConfig
    measures_only = True
    description = "latency/throughput on a device (OpenVINO, ONNX Runtime), model unchanged"

    @classmethod
    def validate_config(
        cls, options: Mapping[str, Any], manager: PluginManager | None = None
    ) -> BenchmarkConfig:
        """Generic keys by :class:`BenchmarkConfig`, the others by the adapter's schema."""
        fields = BenchmarkConfig.model_fields
        generic = {str(k): v for k, v in options.items() if str(k) in fields}
        own = {str(k): v for k, v in options.items() if str(k) not in fields}
        cfg = BenchmarkConfig(**generic)
        _, opts = adapter_options(manager, cfg.adapter, "benchmark", own, also=list(fields))
        return BenchmarkConfig(**generic, **opts.model_dump())

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        from damo_plugins.core.artifact import TensorSpec

        cfg: BenchmarkConfig = self.config  # type: ignore[assignment]
        adapter, opts = adapter_options(
            ctx.manager,
            cfg.adapter,
            "benchmark",
            cfg.model_extra or {},
            also=list(BenchmarkConfig.model_fields),
        )
        shapes = bench_shapes(
            artifact, batch=cfg.batch, imgsz=cfg.imgsz, input_shape=cfg.input_shape
        )
        # The adapters measure at the artifact's input specs: give them the resolved shapes
        # (the model itself is shared, not copied; its path lets a backend read the file).
        shaped = artifact.derive()
        shaped.path = artifact.path
        shaped.inputs = [
            TensorSpec(spec.name, list(dims), spec.dtype)
            for spec, dims in zip(artifact.inputs, shapes)
        ]
        dynamic = any(not _static(d) for spec in artifact.inputs for d in spec.shape)
        options = opts.model_dump()
        budget = {"iterations": cfg.iterations, "seconds": cfg.seconds, "warmup": cfg.warmup}
        common = {"batch": shapes[0][0], "input_shape": shapes[0], "dynamic_input": dynamic}
        # an adapter without a 'hint' option (a third party's) measures its one way only
        both = cfg.both and "hint" in options
        if both:
            options["hint"] = "latency"
        stats = {**adapter.benchmark(shaped, cfg.device, **budget, **options), **common}
        _add_images_per_s(stats)
        if cfg.both and not both:
            stats["throughput"] = None
            ctx.log(f"  note: adapter '{adapter.name}' has no throughput mode; latency only")
        if both:
            options["hint"] = "throughput"
            thr = {**adapter.benchmark(shaped, cfg.device, **budget, **options), **common}
            _add_images_per_s(thr)
            stats["throughput"] = thr
            stats["images_per_s"] = thr["images_per_s"]
        ctx.extra["benchmark"] = stats
        for line in format_stats(stats).splitlines():
            ctx.log(f"  {line}")
        return artifact.derive()

    def verify(self, before: ModelArtifact, after: ModelArtifact, ctx: PassContext) -> Verification:
        """Nothing to check: the model is unchanged; the measurement (``ctx.extra``) is attached."""
        stats = ctx.extra.get("benchmark", {})
        return Verification(
            True, dict(stats), format_stats(stats, one_line=True) if stats else "not measured"
        )


def _add_images_per_s(stats: dict[str, Any]) -> None:
    """Images per second: the adapters count inferences (``fps``); one inference is a batch."""
    fps = stats.get("fps")
    stats["images_per_s"] = None if fps is None else float(fps) * int(stats.get("batch") or 1)


@hookimpl
def damo_passes() -> list[type[Pass]]:
    return [BenchmarkPass]


# ----------------------------------------------------------------------------------- CLI
#: ``damo-opt bench`` flags that are adapter options (given only when set on the command line)
_ADAPTER_FLAGS = ("hint", "threads", "requests", "precision", "streams")


def _flag(loc: tuple[Any, ...]) -> str:
    """The command-line flag of an option's location (``("threads",)`` -> ``--threads``)."""
    return "--" + str(loc[0]).replace("_", "-") if loc else "bench"


def cmd_bench(args: argparse.Namespace) -> int:
    """One ``benchmark`` step through the step runner: exactly what a recipe step measures.

    Latency and throughput are both measured unless ``--hint`` names one: the two answer
    different questions (how long one frame takes; how many frames the device sustains),
    and a user comparing models needs both from the same run and the same shape.
    """
    import tempfile
    from pathlib import Path

    from damo_plugins.core.manager import get_manager
    from damo_plugins.core.passes import ConfigError
    from damo_plugins.core.runner import run_step
    from damo_plugins.core.verbs import model_from_args, print_json

    mgr = get_manager()
    options: dict[str, Any] = {"adapter": args.adapter, "device": args.device}
    options.update(iterations=args.iterations, seconds=args.seconds, warmup=args.warmup)
    options.update(batch=args.batch, imgsz=args.imgsz, both=args.hint is None)
    if args.input_shape is not None:
        options["input_shape"] = list(args.input_shape)
    options.update({k: getattr(args, k) for k in _ADAPTER_FLAGS if getattr(args, k) is not None})
    try:  # checked before the model is loaded: a wrong flag costs nothing
        config = BenchmarkPass.validate_config(options, mgr)
    except ConfigError as exc:
        raise DamoError(f"{_flag(exc.loc)}: {exc.message}", exc.hint) from None
    except ValidationError as exc:  # a generic option (e.g. --iterations 0)
        err = exc.errors()[0]
        raise DamoError(
            f"{_flag(err.get('loc', ()))}: {err.get('msg', 'invalid value')}",
            "see damo-opt bench --help",
        ) from None
    art = model_from_args(args)
    with tempfile.TemporaryDirectory(prefix="damo-bench-") as tmp:
        # the step's own log lines are the result printed below
        ctx = PassContext(manager=mgr, workdir=Path(tmp), log=lambda _: None)
        stats = run_step(BenchmarkPass(config), art, ctx).metrics["benchmark"]
    if args.json:
        print_json(stats)
    else:
        print(format_stats(stats))
    return 0


@hookimpl
def damo_cli(subparsers: argparse._SubParsersAction) -> None:
    from damo_plugins.core.verbs import add_model_args

    p = subparsers.add_parser(
        "bench",
        help="measure latency and throughput on a backend",
        description="Latency (ms per batch, one request at a time) and throughput (images/s "
        "with the device's throughput mode) of a model, at one input shape. A dynamic model "
        "(export --dynamic-batch / --dynamic) is measured at --batch / --imgsz / "
        "--input-shape, or at the shape it records (batch 1 if only the batch is dynamic).",
    )
    add_model_args(p)
    p.add_argument(
        "--adapter", default="openvino", help="openvino | onnxruntime (default openvino)"
    )
    p.add_argument("--device", default="CPU", help="device to measure on (default CPU)")
    p.add_argument(
        "--iterations", type=int, help="measured runs per mode (default: run for --seconds)"
    )
    p.add_argument("--seconds", type=float, help="measuring time per mode (default 5)")
    p.add_argument("--warmup", type=int, default=3, help="discarded runs first (default 3)")
    p.add_argument(
        "--batch",
        type=int,
        help="batch to measure (default: the model's; 1 for a dynamic batch); a static "
        "OpenVINO model is reshaped, a static ONNX model must already have it",
    )
    p.add_argument("--imgsz", type=int, help="square image size N: input [B, C, N, N]")
    # Adapter options: passed on only when given, and checked against the adapter's schema.
    p.add_argument(
        "--hint",
        choices=("latency", "throughput"),
        help="measure only this mode (default: both, latency then throughput)",
    )
    p.add_argument("--threads", type=int, help="inference threads (both adapters)")
    p.add_argument("--requests", type=int, help="requests in flight for throughput (both adapters)")
    p.add_argument(
        "--streams",
        type=int,
        help="OpenVINO only: NUM_STREAMS for throughput (default: the device's throughput mode)",
    )
    p.add_argument(
        "--precision",
        choices=("f32", "bf16", "f16", "default"),
        help="OpenVINO only: inference precision of float ops (default f32; 'default': the "
        "device's)",
    )
    p.add_argument("--json", action="store_true", help="print the measurements as JSON")
    p.set_defaults(func=cmd_bench)
