"""``benchmark``: measure a model on a backend (latency or throughput) as a recipe step.

The measuring belongs to the adapters (OpenVINO, ONNX Runtime); this module holds the
statistics they share and makes benchmarking a step and a command:

* latency is measured like OpenVINO's ``benchmark_app``: the first inference is timed on
  its own (it pays for lazy allocations and kernel selection), then warm-up runs are
  discarded, then requests run one at a time and we report median, p90, min, max and mean;
* throughput keeps several requests in flight and reports frames per second.

The step returns the model unchanged and puts the numbers in the report (``ctx.extra``);
its verification passes with the metrics attached.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from damo_plugins.errors import DamoError
from damo_plugins.hookspecs import hookimpl
from damo_plugins.passes.base import Pass, PassConfig, PassContext
from damo_plugins.verify import Verification

if TYPE_CHECKING:  # pragma: no cover
    from damo_plugins.artifact import ModelArtifact


def summarize_ms(samples_ms: Sequence[float]) -> dict[str, float]:
    """Median, p90, min, max and mean of latencies in milliseconds."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        return {"count": 0}
    return {
        "count": int(a.size),
        "median_ms": float(np.median(a)),
        "p90_ms": float(np.percentile(a, 90)),
        "min_ms": float(a.min()),
        "max_ms": float(a.max()),
        "mean_ms": float(a.mean()),
    }


def measure_latency(
    infer: Callable[[], Any],
    *,
    iterations: int | None = None,
    seconds: float | None = None,
    warmup: int = 3,
) -> dict[str, Any]:
    """Time ``infer()``: first call separately, ``warmup`` discarded, then the measured runs.

    Stops after ``iterations`` runs, or after ``seconds`` (at least 3 runs); with neither,
    runs for 5 seconds.
    """
    if iterations is None and seconds is None:
        seconds = 5.0
    t0 = time.perf_counter()
    infer()
    first_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(max(0, warmup)):
        infer()
    samples: list[float] = []
    start = time.perf_counter()
    while True:
        t = time.perf_counter()
        infer()
        samples.append((time.perf_counter() - t) * 1e3)
        if iterations is not None and len(samples) >= iterations:
            break
        if seconds is not None and time.perf_counter() - start >= seconds and len(samples) >= 3:
            break
    stats = summarize_ms(samples)
    stats["first_inference_ms"] = first_ms
    stats["fps"] = 1e3 / stats["median_ms"] if stats.get("median_ms") else None
    return stats


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


def format_stats(stats: dict[str, Any]) -> str:
    """One line for logs: backend, device, hint, median/p90 or FPS."""
    where = f"{stats.get('adapter', '?')} {stats.get('device', '')} {stats.get('hint', '')}".strip()
    if stats.get("hint") == "throughput":
        return (
            f"{where}: {stats.get('fps', 0):.1f} FPS with {stats.get('requests', '?')} requests "
            f"(median latency {stats.get('median_ms', 0):.2f} ms)"
        )
    return (
        f"{where}: median {stats.get('median_ms', 0):.2f} ms, p90 {stats.get('p90_ms', 0):.2f} ms, "
        f"min {stats.get('min_ms', 0):.2f}, max {stats.get('max_ms', 0):.2f}, "
        f"first inference {stats.get('first_inference_ms', 0):.1f} ms"
    )


@hookimpl
def damo_passes() -> list[type[Pass]]:
    return [BenchmarkPass]


# ----------------------------------------------------------------------------------- CLI
def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from damo_plugins.cli import load_model_from_args
    from damo_plugins.manager import get_manager

    art = load_model_from_args(args)
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
    from damo_plugins.cli import add_model_args

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
