"""``benchmark``: measure a model on a backend (latency or throughput) as a recipe step.

The measuring belongs to the adapters (OpenVINO, ONNX Runtime), with the statistics of
:mod:`damo_plugins.lib.timing`; this plugin makes benchmarking a step and a command. Latency
runs requests one at a time (``benchmark_app``'s method); throughput keeps several in flight
and reports frames per second.

The step returns the model unchanged and puts the numbers in the report (``ctx.extra``);
its verification passes with the metrics attached.

Options: :class:`BenchmarkConfig` holds what every benchmark takes (device, how long to
measure); the rest are the adapter's own (``Adapter.options["benchmark"]``: OpenVINO's
``hint``, ``precision``, ``threads``, ``requests``; ONNX Runtime's ``hint``, ``threads``,
``requests``, ``providers``), checked against its schema when the recipe is validated.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict, Field, ValidationError

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
    seconds: float | None = Field(None, gt=0, description="measuring time (default 5 s)")
    warmup: int = Field(3, ge=0)


class BenchmarkPass(Pass):
    """Measure latency or throughput; the model passes through unchanged."""

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
        cfg: BenchmarkConfig = self.config  # type: ignore[assignment]
        adapter, opts = adapter_options(
            ctx.manager,
            cfg.adapter,
            "benchmark",
            cfg.model_extra or {},
            also=list(BenchmarkConfig.model_fields),
        )
        stats = adapter.benchmark(
            artifact,
            cfg.device,
            iterations=cfg.iterations,
            seconds=cfg.seconds,
            warmup=cfg.warmup,
            **opts.model_dump(),
        )
        ctx.extra["benchmark"] = stats
        ctx.log(f"  {format_stats(stats)}")
        return artifact.derive()

    def verify(self, before: ModelArtifact, after: ModelArtifact, ctx: PassContext) -> Verification:
        """Nothing to check: the model is unchanged; the measurement (``ctx.extra``) is attached."""
        stats = ctx.extra.get("benchmark", {})
        return Verification(True, dict(stats), format_stats(stats) if stats else "not measured")


@hookimpl
def damo_passes() -> list[type[Pass]]:
    return [BenchmarkPass]


# ----------------------------------------------------------------------------------- CLI
#: ``damo-opt bench`` flags that are adapter options (given only when set on the command line)
_ADAPTER_FLAGS = ("hint", "threads", "requests", "precision")


def _flag(loc: tuple[Any, ...]) -> str:
    """The command-line flag of an option's location (``("threads",)`` -> ``--threads``)."""
    return "--" + str(loc[0]).replace("_", "-") if loc else "bench"


def cmd_bench(args: argparse.Namespace) -> int:
    """One ``benchmark`` step through the step runner: exactly what a recipe step measures."""
    import json
    import tempfile
    from pathlib import Path

    from damo_plugins.core.manager import get_manager
    from damo_plugins.core.passes import ConfigError
    from damo_plugins.core.runner import run_step
    from damo_plugins.core.verbs import model_from_args

    mgr = get_manager()
    options: dict[str, Any] = {"adapter": args.adapter, "device": args.device}
    options.update(iterations=args.iterations, seconds=args.seconds, warmup=args.warmup)
    options.update({k: getattr(args, k) for k in _ADAPTER_FLAGS if getattr(args, k) is not None})
    try:  # checked before the model is loaded: a wrong flag costs nothing
        config = BenchmarkPass.validate_config(options, mgr)
    except ConfigError as exc:
        raise DamoError(f"{_flag(exc.loc)}: {exc.message}", exc.hint) from None
    except ValidationError as exc:  # a generic option (e.g. --iterations 0)
        err = exc.errors()[0]
        raise DamoError(f"{_flag(err.get('loc', ()))}: {err.get('msg', 'invalid value')}") from None
    art = model_from_args(args)
    if not art.inputs:
        raise DamoError(
            "cannot benchmark: the model's input shape is unknown", "give --input-shape"
        )
    with tempfile.TemporaryDirectory(prefix="damo-bench-") as tmp:
        # the step's own log line is the result printed below
        ctx = PassContext(manager=mgr, workdir=Path(tmp), log=lambda _: None)
        stats = run_step(BenchmarkPass(config), art, ctx).metrics["benchmark"]
    if args.json:
        print(json.dumps(stats, indent=2, default=str))
    else:
        print(format_stats(stats))
    return 0


@hookimpl
def damo_cli(subparsers: argparse._SubParsersAction) -> None:
    from damo_plugins.core.verbs import add_model_args

    p = subparsers.add_parser("bench", help="measure latency or throughput on a backend")
    add_model_args(p)
    p.add_argument(
        "--adapter", default="openvino", help="openvino | onnxruntime (default openvino)"
    )
    p.add_argument("--device", default="CPU")
    p.add_argument("--iterations", type=int, help="measured runs (default: --seconds)")
    p.add_argument("--seconds", type=float, help="measuring time (default 5)")
    p.add_argument("--warmup", type=int, default=3)
    # Adapter options: passed on only when given, and checked against the adapter's schema.
    p.add_argument(
        "--hint", choices=("latency", "throughput"), help="default latency (both adapters)"
    )
    p.add_argument("--threads", type=int, help="inference threads (both adapters)")
    p.add_argument(
        "--requests", type=int, help="requests in flight for throughput (both adapters)"
    )
    p.add_argument(
        "--precision",
        choices=("f32", "bf16", "f16", "default"),
        help="OpenVINO only: inference precision of float ops (default f32; 'default': the "
        "device's)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
