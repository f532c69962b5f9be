"""Latency measurement shared by the benchmarking adapters (OpenVINO, ONNX Runtime).

Latency is measured like OpenVINO's ``benchmark_app``: the first inference is timed on its
own (it pays for lazy allocations and kernel selection), then warm-up runs are discarded,
then requests run one at a time and we report median, p90, min, max and mean.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


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


