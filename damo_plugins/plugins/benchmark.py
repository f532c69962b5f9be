"""``benchmark``: measure a model on a backend (latency or throughput) as a recipe step.

The measuring belongs to the adapters (OpenVINO, ONNX Runtime), with the statistics of
:mod:`damo_plugins.lib.timing`; this plugin makes benchmarking a step and a command. Latency
runs requests one at a time (``benchmark_app``'s method); throughput keeps several in flight
and reports frames per second.

The step returns the model unchanged and puts the numbers in the report (``ctx.extra``);
its verification passes with the metrics attached.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from damo_plugins.core.errors import DamoError
from damo_plugins.core.hookspecs import hookimpl
from damo_plugins.core.passes import Pass, PassConfig, PassContext
from damo_plugins.core.verify import Verification
from damo_plugins.lib.timing import format_stats

if TYPE_CHECKING:  # pragma: no cover
    from damo_plugins.core.artifact import ModelArtifact


class BenchmarkConfig(PassConfig):
    adapter: str = Field("openvino", description="openvino | onnxruntime")
    device: str = Field("CPU", description="device name (CPU, GPU, NPU, AUTO, ...)")
    hint: Literal["latency", "throughput"] = "latency"
    iterations: int | None = Field(
        None, ge=1, description="measured runs (default: run for `seconds`)"
    )
    seconds: float | None = Field(None, gt=0, description="measuring time (default 5 s)")
    warmup: int = Field(3, ge=0)
    threads: int | None = Field(
        None, ge=1, description="inference threads (default: the backend's)"
    )
    precision: Literal["f32", "bf16", "f16", "default"] = Field(
        "f32",
        description="OpenVINO inference precision of float ops ('default': the device's choice)",
    )


class BenchmarkPass(Pass):
    """Measure latency or throughput; the model passes through unchanged."""

    name = "benchmark"
    accepts = ("torch", "onnx", "openvino")
    produces = None
    Config = BenchmarkConfig
    measures_only = True
    description = "latency/throughput on a device (OpenVINO, ONNX Runtime), model unchanged"

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        cfg: BenchmarkConfig = self.config  # type: ignore[assignment]
        adapter = ctx.manager.get_adapter(cfg.adapter)
        stats = adapter.benchmark(
            artifact,
            cfg.device,
            hint=cfg.hint,
            iterations=cfg.iterations,
            seconds=cfg.seconds,
            warmup=cfg.warmup,
            threads=cfg.threads,
            precision=None if cfg.precision == "default" else cfg.precision,
        )
        ctx.extra["benchmark"] = stats
        ctx.log(f"  {format_stats(stats)}")
        self._stats = stats
        return artifact.derive()

    def verify(self, before: ModelArtifact, after: ModelArtifact, ctx: PassContext) -> Verification:
        stats = getattr(self, "_stats", None) or ctx.extra.get("benchmark", {})
        return Verification(True, dict(stats), format_stats(stats) if stats else "not measured")


@hookimpl
def damo_passes() -> list[type[Pass]]:
    return [BenchmarkPass]


# ----------------------------------------------------------------------------------- CLI
def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from damo_plugins.core.manager import get_manager
    from damo_plugins.core.verbs import model_from_args

    art = model_from_args(args)
    if not art.inputs:
        raise DamoError(
            "cannot benchmark: the model's input shape is unknown", "give --input-shape"
        )
    adapter = get_manager().get_adapter(args.adapter)
    stats = adapter.benchmark(
        art,
        args.device,
        hint=args.hint,
        iterations=args.iterations,
        seconds=args.seconds,
        warmup=args.warmup,
        threads=args.threads,
        precision=None if args.precision == "default" else args.precision,
    )
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
    p.add_argument("--hint", choices=("latency", "throughput"), default="latency")
    p.add_argument("--iterations", type=int, help="measured runs (default: --seconds)")
    p.add_argument("--seconds", type=float, help="measuring time (default 5)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, help="inference threads")
    p.add_argument(
        "--precision",
        choices=("f32", "bf16", "f16", "default"),
        default="f32",
        help="OpenVINO inference precision of float ops (default f32; 'default': the device's)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
