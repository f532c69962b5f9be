"""Latency measurement: one model (the benchmarking adapters), or several side by side.

One model is measured like OpenVINO's ``benchmark_app`` (:func:`measure_latency`): the first
inference is timed on its own (it pays for lazy allocations and kernel selection), then
warm-up runs are discarded, then requests run one at a time and we report median, p90, min,
max and mean.

Several models are compared in *interleaved rounds* (:func:`interleaved_timing`, or
:func:`interleave` for any measurement that returns a number): every round runs every
variant once, in an order that rotates from round to round, so a burst of load from another
process hits all variants alike instead of one of them. The figures to quote are then the
medians and, above all, ratios taken *within* a round (:func:`round_ratio`): on a shared
machine the absolute milliseconds drift by tens of percent while the per-round ratios stay
put. The benchmark scripts and the ``optimize`` command (a candidate against its baseline,
on the target device) measure this way.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
Clock = Literal["wall", "cpu"]


def summarize_ms(samples_ms: Sequence[float]) -> dict[str, float]:
    """Median, p90, min, max and mean of latencies in milliseconds."""
    import numpy as np

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
    runs for 5 seconds. A zero or negative count or time is a ``ValueError``: it would
    measure nothing (or loop until ``seconds`` can never be reached), and a benchmark that
    reports on no runs is worse than none.
    """
    check_budget(iterations=iterations, seconds=seconds, warmup=warmup)
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


def check_budget(
    *, iterations: int | None = None, seconds: float | None = None, warmup: int = 0
) -> None:
    """Refuse a measuring budget that cannot measure: ``iterations`` and ``seconds`` > 0,
    ``warmup`` >= 0 (zero warm-up runs is a legitimate choice; zero measured runs is not)."""
    if iterations is not None and (isinstance(iterations, bool) or iterations < 1):
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    if seconds is not None and not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"seconds must be a positive number, got {seconds}")
    if warmup < 0:
        raise ValueError(f"warmup must be 0 or more, got {warmup}")


def check_benchmark_request(
    *, iterations: int | None, seconds: float | None, warmup: int, hint: str
) -> None:
    """What every adapter's ``benchmark`` refuses before touching its backend, as one
    :class:`~damo_plugins.core.errors.DamoError` line: a budget :func:`check_budget` rejects,
    or a ``hint`` other than ``latency`` / ``throughput`` (the two modes the results name)."""
    from damo_plugins.core.errors import DamoError

    try:
        check_budget(iterations=iterations, seconds=seconds, warmup=warmup)
    except ValueError as exc:
        raise DamoError(f"cannot benchmark: {exc}") from None
    if hint not in ("latency", "throughput"):
        raise DamoError(f"unknown benchmark hint '{hint}'", "use latency or throughput")


def _where(stats: Mapping[str, Any]) -> str:
    return f"{stats.get('adapter', '?')} {stats.get('device', '')}".strip()


def _latency_line(stats: Mapping[str, Any]) -> str:
    batch = stats.get("batch")
    per = f" per batch of {batch}" if batch and batch != 1 else ""
    return (
        f"latency{per}: median {stats.get('median_ms', 0):.2f} ms, "
        f"p90 {stats.get('p90_ms', 0):.2f} ms, min {stats.get('min_ms', 0):.2f}, "
        f"max {stats.get('max_ms', 0):.2f}, first inference "
        f"{stats.get('first_inference_ms', 0):.1f} ms"
    )


def _throughput_line(stats: Mapping[str, Any]) -> str:
    batch = stats.get("batch") or 1
    ips = stats.get("images_per_s")
    if ips is None and stats.get("fps") is not None:
        ips = stats["fps"] * batch
    streams = f", {stats['streams']} streams" if stats.get("streams") else ""
    return (
        f"throughput: {ips or 0:.1f} images/s (batch {batch}, "
        f"{stats.get('requests', '?')} requests{streams}; median "
        f"{stats.get('median_ms', 0):.2f} ms per request)"
    )


def format_stats(stats: Mapping[str, Any], *, one_line: bool = False) -> str:
    """Log lines for a benchmark: backend, device, shape, then latency and/or throughput.

    ``stats`` is one measurement (``hint`` says which) or, as ``damo-opt bench`` reports
    by default, a latency measurement with the throughput one under ``"throughput"``.
    ``one_line`` joins the two with "; " (for a report's verification message).
    """
    head = _where(stats)
    if stats.get("input_shape"):
        head += f" {list(stats['input_shape'])}"
    if stats.get("precision"):
        head += f" {stats['precision']}"
    lines = []
    if stats.get("hint") == "throughput":
        lines.append(_throughput_line(stats))
    else:
        lines.append(_latency_line(stats))
        if isinstance(stats.get("throughput"), Mapping):
            lines.append(_throughput_line(stats["throughput"]))
    if len(lines) == 1 or one_line:
        return f"{head}: {'; '.join(lines)}"
    return f"{head}:\n" + "\n".join(f"  {line}" for line in lines)


# ------------------------------------------------------------------- side by side
def interleave(measures: Mapping[K, Callable[[], T]], rounds: int) -> dict[K, list[T]]:
    """Call every measure once per round, rotating the order; ``{key: [value per round]}``.

    With two variants the order alternates (ab, ba, ab, ...); with more, round ``r`` starts
    at the ``r``-th variant. Each list is in round order, so ``out[a][r]`` and ``out[b][r]``
    were measured next to each other.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    keys = list(measures)
    out: dict[K, list[T]] = {k: [] for k in keys}
    for r in range(rounds):
        shift = r % len(keys) if keys else 0
        for k in keys[shift:] + keys[:shift]:
            out[k].append(measures[k]())
    return out


def round_ratio(slow: Sequence[float], fast: Sequence[float]) -> float:
    """Median over rounds of ``slow[r] / fast[r]``: a speed-up measured side by side.

    More robust than the ratio of the two medians when the load changes between rounds,
    because each ratio compares two measurements taken under the same load.
    """
    if len(slow) != len(fast) or not slow:
        raise ValueError("round_ratio needs two non-empty series of the same rounds")
    return statistics.median(a / b for a, b in zip(slow, fast))


@dataclass
class Interleaved(Generic[K]):
    """Times of several variants measured in the same rounds.

    ``wall[k][r]`` and ``cpu[k][r]`` are the milliseconds of each timed call of variant ``k``
    in round ``r``: elapsed time, and CPU time of this process. With one thread, CPU time is
    the work done without the time spent waiting for a core, which is what dominates
    elapsed time on an oversubscribed machine.
    """

    wall: dict[K, list[list[float]]]
    cpu: dict[K, list[list[float]]]

    @property
    def keys(self) -> list[K]:
        return list(self.wall)

    def _clock(self, clock: Clock) -> dict[K, list[list[float]]]:
        if clock not in ("wall", "cpu"):
            raise ValueError(f"clock must be 'wall' or 'cpu', not {clock!r}")
        return self.wall if clock == "wall" else self.cpu

    def samples(self, key: K, clock: Clock = "wall") -> list[float]:
        """Every timed call of ``key``, in ms."""
        return [t for rnd in self._clock(clock)[key] for t in rnd]

    def median(self, key: K, clock: Clock = "wall") -> float:
        """Median of all of ``key``'s timed calls, in ms."""
        return statistics.median(self.samples(key, clock))

    def per_round(self, key: K, clock: Clock = "wall") -> list[float]:
        """Median of each round's calls of ``key``, in ms (one value per round)."""
        return [statistics.median(rnd) for rnd in self._clock(clock)[key]]

    def ratio(self, slow: K, fast: K, clock: Clock = "wall") -> float:
        """Speed-up of ``fast`` over ``slow``: median of the per-round ratios."""
        return round_ratio(self.per_round(slow, clock), self.per_round(fast, clock))

    def ratio_of_medians(self, slow: K, fast: K, clock: Clock = "wall") -> float:
        return self.median(slow, clock) / self.median(fast, clock)

    def summary(self, base: K, clock: Clock = "wall") -> dict[K, dict[str, float]]:
        """Per variant: median ms and the speed-up against ``base`` (both ways of taking it)."""
        return {
            k: {
                "median_ms": self.median(k, clock),
                "speedup": self.ratio(base, k, clock),
                "speedup_of_medians": self.ratio_of_medians(base, k, clock),
            }
            for k in self.keys
        }


def interleaved_timing(
    fns: Mapping[K, Callable[[], Any]],
    rounds: int,
    *,
    calls: int = 1,
    slot_seconds: float | None = None,
    warmup: int = 1,
    slot_warmup: int = 0,
    max_calls: int = 100,
) -> Interleaved[K]:
    """Time every ``fn`` in interleaved rounds (see :func:`interleave`).

    Before the first round each variant runs ``warmup`` discarded calls (interleaved too).
    In a round, each variant in turn runs ``slot_warmup`` discarded calls (caches go cold
    when another variant ran in between), then ``calls`` timed calls. With ``slot_seconds``
    the number of timed calls is instead fixed up front, per variant, to fill about that
    long (from one timed call after the warm-up; between 2 and ``max_calls``), so that
    every round weighs the same and a slow variant does not take over the run.
    """
    if calls < 1:
        raise ValueError(f"calls must be at least 1, got {calls}")
    for _ in range(max(0, warmup)):
        for fn in fns.values():
            fn()
    n_calls = dict.fromkeys(fns, calls)
    if slot_seconds is not None:
        for key, fn in fns.items():
            t = time.perf_counter()
            fn()
            est = time.perf_counter() - t
            n_calls[key] = int(min(max_calls, max(2, math.ceil(slot_seconds / max(est, 1e-5)))))

    def slot(key: K) -> Callable[[], tuple[list[float], list[float]]]:
        fn = fns[key]

        def run() -> tuple[list[float], list[float]]:
            for _ in range(slot_warmup):
                fn()
            wall, cpu = [], []
            for _ in range(n_calls[key]):
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                wall.append((time.perf_counter() - t0) * 1e3)
                cpu.append((time.process_time() - c0) * 1e3)
            return wall, cpu

        return run

    measured = interleave({k: slot(k) for k in fns}, rounds)
    return Interleaved(
        wall={k: [w for w, _ in v] for k, v in measured.items()},
        cpu={k: [c for _, c in v] for k, v in measured.items()},
    )
