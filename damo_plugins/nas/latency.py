"""Latency look-up tables: profile convolutions on a device, predict a backbone by summing.

As in MAE-NAS (upstream ``tinynas/latency``), a backbone's latency is predicted from a table
of measured single-convolution latencies, so the search never runs a network. An entry is
one convolution (+ bias + ReLU, what a BN-folded conv becomes) at batch 1, keyed by
``(in, out, kernel, stride, input size)``. Each measured op also pays the runtime's fixed
per-inference cost; that cost is measured once on a trivial model (``overhead_ms``) and
taken out of the entries, and a prediction adds it back once.

A convolution missing from the table is estimated from the nearest entry with the same
kernel, stride and input size (nearest in log-channels), scaled by the ratio of
multiply-accumulates; failing that, from the table's median time per multiply-accumulate.
Predictions report how many ops were estimated that way.

**Calibration.** The sum of entries ranks backbones well but under-predicts them: a whole
backbone also pays, per layer, for activations, residual adds, concatenations, pooling and
the memory traffic between layers, which no single-conv entry contains. So ``profile``
(``damo-opt nas profile --calibrate N``) also times N whole random backbones of the space
and fits three non-negative coefficients (:func:`fit_calibration`)::

    latency = scale * sum(entries) + per_conv_ms * convs + offset_ms

``convs`` being the number of convolutions the backbone runs. They are stored in the table
(``calibration``) and used by :meth:`LatencyTable.predict_ops`; a table without them (older
files, ``--calibrate 0``) predicts ``overhead_ms + sum(entries)`` as before.

Backends: ``openvino`` (``import openvino as ov``; the op is built directly with an opset,
the backbone converted with ``ov.convert_model``) and ``torch`` (eager, inference mode).
Whole backbones are those the DAMO-YOLO builder makes (:func:`~damo_plugins.nas.backbone.
detector_backbone`, RepConvs fused).
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from damo_plugins.core.errors import DamoError
from damo_plugins.nas.analysis import Analyzer, ConvOp, Genome, join
from damo_plugins.nas.space import SearchSpace

#: (in channels, out channels, kernel, stride, input size)
OpKey = tuple[int, int, int, int, int]
BACKENDS = ("openvino", "torch")
FORMAT = "damo-nas-latency/1"


def op_key(op: ConvOp) -> OpKey:
    return (op[0], op[1], op[2], op[3], op[4])


def key_str(key: OpKey) -> str:
    cin, cout, k, s, h = key
    return f"{cin}x{cout}_k{k}_s{s}_h{h}"


def parse_key(text: str) -> OpKey:
    try:
        ch, ks, ss, hs = text.split("_")
        cin, cout = ch.split("x")
        return (int(cin), int(cout), int(ks[1:]), int(ss[1:]), int(hs[1:]))
    except (ValueError, IndexError):
        raise DamoError(
            f"latency table: bad entry key {text!r}", "expected e.g. '64x96_k3_s2_h80'"
        ) from None


def _macs(key: OpKey) -> float:
    cin, cout, k, s, h = key
    ho = (h - 1) // s + 1
    return float(cin * cout * k * k * ho * ho)


@dataclass(frozen=True)
class Calibration:
    """``latency = scale * sum(entries) + per_conv_ms * convs + offset_ms`` (all >= 0).

    ``structures`` whole backbones were measured to fit it; ``mean_rel_error`` is the fit's
    error on them (before: ``mean_rel_error_uncalibrated``).
    """

    scale: float
    per_conv_ms: float
    offset_ms: float
    structures: int = 0
    mean_rel_error: float | None = None
    mean_rel_error_uncalibrated: float | None = None

    def apply(self, table_ms: float, convs: int) -> float:
        return self.scale * table_ms + self.per_conv_ms * convs + self.offset_ms

    def to_json(self) -> dict[str, Any]:
        return {
            "model": "scale * sum(entries) + per_conv_ms * convs + offset_ms",
            "scale": self.scale,
            "per_conv_ms": self.per_conv_ms,
            "offset_ms": self.offset_ms,
            "structures": self.structures,
            "mean_rel_error": self.mean_rel_error,
            "mean_rel_error_uncalibrated": self.mean_rel_error_uncalibrated,
        }

    @classmethod
    def from_json(cls, data: Any, source: str) -> Calibration:
        if not isinstance(data, dict):
            raise DamoError(f"{source}: 'calibration' must be an object")
        vals = []
        for name in ("scale", "per_conv_ms", "offset_ms"):
            v = data.get(name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise DamoError(
                    f"{source}: calibration '{name}' must be a non-negative number, got {v!r}",
                    "re-create the table with 'damo-opt nas profile'",
                )
            vals.append(float(v))
        return cls(
            *vals,
            structures=int(data.get("structures") or 0),
            mean_rel_error=data.get("mean_rel_error"),
            mean_rel_error_uncalibrated=data.get("mean_rel_error_uncalibrated"),
        )


def fit_calibration(
    table_ms: Sequence[float], convs: Sequence[int], measured_ms: Sequence[float]
) -> tuple[float, float, float]:
    """Non-negative least squares for ``measured ~ scale * table + per_conv * convs + offset``.

    Why this model: the table's entries already rank backbones well (they hold the convs'
    own cost); what they miss is roughly proportional to the conv work (``scale``: memory
    traffic, layout changes), a fixed cost per layer (``per_conv_ms``: activation, add,
    concat, kernel launch) and a fixed cost per inference (``offset_ms``: Focus, input and
    output). Three coefficients fit from a handful of measured backbones; each is physically
    a cost, so they are kept non-negative (a negative cost would only fit noise).

    Residuals are *relative* (each row divided by its measurement), because latency budgets
    and the reported error are relative: a 2 ms miss matters on a 10 ms backbone, not on an
    80 ms one. With three unknowns the exact non-negative solution is found by solving the
    least-squares problem on every subset of the coefficients and keeping the best
    non-negative one (the optimum is the unconstrained fit on its non-zero coefficients).
    """
    import itertools

    import numpy as np

    n = len(measured_ms)
    if not (len(table_ms) == len(convs) == n):
        raise ValueError("fit_calibration: inputs of different lengths")
    if n < 3:
        raise DamoError(
            f"latency calibration needs at least 3 measured backbones, got {n}",
            "pass --calibrate 3 or more (or 0 to skip calibration)",
        )
    m = np.asarray(measured_ms, dtype=np.float64)
    if not np.all(m > 0):
        raise DamoError("latency calibration: measured latencies must be positive")
    x = np.stack([np.asarray(table_ms, np.float64), np.asarray(convs, np.float64), np.ones(n)], 1)
    xw, yw = x / m[:, None], np.ones(n)  # relative residuals: (x @ coef - m) / m
    best: tuple[float, np.ndarray] | None = None
    for size in (3, 2, 1):
        for cols in itertools.combinations(range(3), size):
            coef = np.zeros(3)
            coef[list(cols)] = np.linalg.lstsq(xw[:, cols], yw, rcond=None)[0]
            if np.any(coef < 0):
                continue
            err = float(np.sum((xw @ coef - yw) ** 2))
            if best is None or err < best[0] - 1e-15:
                best = (err, coef)
    assert best is not None  # a single non-negative column always fits (all inputs >= 0)
    scale, per_conv, offset = (float(v) for v in best[1])
    return scale, per_conv, offset


@dataclass
class LatencyTable:
    """Measured per-convolution latencies (ms, overhead removed) of one device."""

    backend: str
    device: str
    threads: int | None
    overhead_ms: float
    entries: dict[OpKey, float]
    meta: dict[str, Any] = field(default_factory=dict)
    calibration: Calibration | None = None

    def __post_init__(self) -> None:
        self._cache: dict[OpKey, tuple[float, bool]] = {}
        self._index: dict[tuple[int, int, int], list[tuple[OpKey, float]]] = {}
        for key, ms in self.entries.items():
            self._index.setdefault((key[2], key[3], key[4]), []).append((key, ms))
        per_mac = [ms / _macs(k) for k, ms in self.entries.items() if _macs(k) > 0]
        self._ms_per_mac = statistics.median(per_mac) if per_mac else 0.0

    # ------------------------------------------------------------------ prediction
    def op_ms(self, key: OpKey) -> tuple[float, bool]:
        """(latency of one op, whether it was estimated rather than looked up)."""
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if key in self.entries:
            res = (self.entries[key], False)
        else:
            near = self._index.get((key[2], key[3], key[4]))
            if near:
                lc, lo = math.log(key[0]), math.log(key[1])
                ref, ms = min(
                    near,
                    key=lambda e: (math.log(e[0][0]) - lc) ** 2 + (math.log(e[0][1]) - lo) ** 2,
                )
                res = (ms * _macs(key) / _macs(ref), True)
            else:
                res = (self._ms_per_mac * _macs(key), True)
        self._cache[key] = res
        return res

    def table_sum(self, ops: Iterable[ConvOp]) -> tuple[float, int, int]:
        """(sum of the ops' entries in ms, number of convs run, number of estimated ops)."""
        total = 0.0
        convs = missing = 0
        for op in ops:
            ms, est = self.op_ms(op_key(op))
            total += ms * op[6]
            convs += op[6]
            missing += est
        return total, convs, missing

    def predict_ops(self, ops: Iterable[ConvOp]) -> tuple[float, int]:
        """Predicted latency (ms) of a network made of ``ops``, and the count of estimated ops.

        Calibrated tables apply their :class:`Calibration`; others add the per-inference
        overhead to the sum of entries.
        """
        total, convs, missing = self.table_sum(ops)
        if self.calibration is not None:
            return self.calibration.apply(total, convs), missing
        return self.overhead_ms + total, missing

    def predict_uncalibrated(self, analyzer: Analyzer, genome: Genome) -> float:
        return self.overhead_ms + self.table_sum(analyzer.ops(genome, deploy=True))[0]

    def predict(self, analyzer: Analyzer, genome: Genome) -> float:
        """Latency of the deployed backbone (RepConvs fused), whatever the analyzer counts."""
        return self.predict_ops(analyzer.ops(genome, deploy=True))[0]

    # ------------------------------------------------------------------ files
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "backend": self.backend,
            "device": self.device,
            "threads": self.threads,
            "unit": "ms",
            "overhead_ms": self.overhead_ms,
            "meta": self.meta,
            **({"calibration": self.calibration.to_json()} if self.calibration else {}),
            "entries": {key_str(k): round(v, 6) for k, v in sorted(self.entries.items())},
        }

    def save(self, path: str | Path) -> Path:
        from damo_plugins.core.io import write_bytes

        return write_bytes(path, (json.dumps(self.to_json(), indent=1) + "\n").encode())

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        from damo_plugins.core.io import check_input_file

        p = check_input_file(path, "latency table")
        try:
            data = json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise DamoError(
                f"{p}: latency table is not JSON ({exc})", "create one with 'damo-opt nas profile'"
            ) from None
        if (
            not isinstance(data, dict)
            or data.get("format") != FORMAT
            or not isinstance(data.get("entries"), dict)
        ):
            raise DamoError(
                f"{p}: not a latency table ({FORMAT})", "create one with 'damo-opt nas profile'"
            )
        entries = {}
        for k, v in data["entries"].items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise DamoError(f"{p}: entry {k!r} is not a non-negative number")
            entries[parse_key(k)] = float(v)
        if not entries:
            raise DamoError(f"{p}: latency table has no entries")
        cal = data.get("calibration")
        return cls(
            str(data.get("backend")),
            str(data.get("device")),
            data.get("threads"),
            float(data.get("overhead_ms", 0.0)),
            entries,
            dict(data.get("meta") or {}),
            Calibration.from_json(cal, str(p)) if cal is not None else None,
        )


# ---------------------------------------------------------------------- measurement
def _paired_median_ms(
    run_a: Callable[[], Any], run_b: Callable[[], Any], repeats: int, warmup: int
) -> tuple[float, float]:
    """Medians (ms) of two calls timed alternately (a, b, a, b, ...)."""
    for _ in range(warmup):
        run_a()
        run_b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, times in ((run_a, ta), (run_b, tb)):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(ta), statistics.median(tb)


def _median_ms(run: Callable[[], Any], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


class _OpenVINO:
    def __init__(self, device: str, threads: int | None) -> None:
        try:
            import openvino as ov
        except ImportError:  # pragma: no cover - openvino is installed in CI
            raise DamoError(
                "the openvino backend needs the 'openvino' package", "pip install openvino"
            ) from None
        self.ov = ov
        self.core = ov.Core()
        if device not in self.core.available_devices:
            raise DamoError(
                f"OpenVINO device {device!r} is not available",
                f"available: {', '.join(self.core.available_devices)}",
            )
        self.device = device
        self._overhead_ms = 0.0
        self.config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)

    def info(self) -> dict[str, Any]:
        prec = self.core.get_property(self.device, "INFERENCE_PRECISION_HINT")
        name = prec.get_type_name() if hasattr(prec, "get_type_name") else str(prec)
        return {"openvino": self.ov.__version__, "inference_precision": name}

    def prepare(self, model: Any, shape: Sequence[int]) -> Callable[[], Any]:
        """Compile ``model`` and return one inference on a fixed random input."""
        import numpy as np

        compiled = self.core.compile_model(model, self.device, self.config)
        req = compiled.create_infer_request()
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        req.set_input_tensor(self.ov.Tensor(x))
        return req.infer

    def _time(self, model: Any, shape: Sequence[int], repeats: int, warmup: int) -> float:
        return _median_ms(self.prepare(model, shape), repeats, warmup)

    def op_parts(self, key: OpKey, repeats: int, warmup: int) -> tuple[float, float]:
        """Latency of one conv *inside* a network, as (time without it, time with it).

        A one-conv model pays for layout/precision conversions at its input and output
        (on a CPU with bf16 these cost more than a small conv), which a conv inside a
        backbone does not. So we time ``relu(conv(x))`` and ``relu(conv(x) + conv'(x))``:
        both have the same input and output tensors, and the second has exactly one more
        conv (the add fuses into it), so the difference is that conv's cost in context.
        The two models run alternately, so that load on a shared machine hits both alike.
        """
        import numpy as np
        import openvino.opset13 as ops

        cin, cout, k, s, h = key
        rng = np.random.default_rng(0)

        def conv(x: Any) -> Any:
            w = ops.constant((rng.standard_normal((cout, cin, k, k)) * 0.05).astype(np.float32))
            y = ops.convolution(x, w, [s, s], [k // 2, k // 2], [k // 2, k // 2], [1, 1])
            return ops.add(y, ops.constant(np.zeros((1, cout, 1, 1), np.float32)))

        p1 = ops.parameter([1, cin, h, h], self.ov.Type.f32)
        one = self.ov.Model([ops.relu(conv(p1))], [p1])
        p2 = ops.parameter([1, cin, h, h], self.ov.Type.f32)
        two = self.ov.Model([ops.relu(ops.add(conv(p2), conv(p2)))], [p2])
        shape = [1, cin, h, h]
        return _paired_median_ms(
            self.prepare(one, shape), self.prepare(two, shape), repeats, warmup
        )

    def overhead(self, repeats: int, warmup: int) -> float:
        import openvino.opset13 as ops

        p = ops.parameter([1, 8, 4, 4], self.ov.Type.f32)
        self._overhead_ms = self._time(
            self.ov.Model([ops.relu(p)], [p]), [1, 8, 4, 4], repeats, warmup
        )
        return self._overhead_ms

    def prepare_module(self, net: Any, shape: Sequence[int]) -> Callable[[], Any]:
        import torch

        model = self.ov.convert_model(net.eval(), example_input=torch.zeros(*shape))
        return self.prepare(model, shape)


class _Torch:
    def __init__(self, device: str, threads: int | None) -> None:
        import torch

        if device.upper() != "CPU":
            raise DamoError(f"the torch latency backend measures CPU only, not {device!r}")
        self.torch = torch
        self._overhead_ms = 0.0
        if threads:
            torch.set_num_threads(int(threads))

    def info(self) -> dict[str, Any]:
        return {"torch": self.torch.__version__, "threads": self.torch.get_num_threads()}

    def prepare_module(self, net: Any, shape: Sequence[int]) -> Callable[[], Any]:
        torch = self.torch
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        net.eval()

        def run() -> None:
            with torch.inference_mode():
                net(x)

        return run

    def _time(self, net: Any, shape: Sequence[int], repeats: int, warmup: int) -> float:
        return _median_ms(self.prepare_module(net, shape), repeats, warmup)

    def op_parts(self, key: OpKey, repeats: int, warmup: int) -> tuple[float, float]:
        """(per-call overhead, time of ``relu(conv(x))``): eager torch has no layout
        conversions at a model's boundary, so one conv alone is its cost in a network."""
        nn = self.torch.nn
        cin, cout, k, s, h = key
        net = nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2), nn.ReLU())
        return self._overhead_ms, self._time(net, [1, cin, h, h], repeats, warmup)

    def overhead(self, repeats: int, warmup: int) -> float:
        self._overhead_ms = self._time(self.torch.nn.ReLU(), [1, 8, 4, 4], repeats, warmup)
        return self._overhead_ms


def runner(backend: str, device: str = "CPU", threads: int | None = None) -> _OpenVINO | _Torch:
    if backend == "openvino":
        return _OpenVINO(device, threads)
    if backend == "torch":
        return _Torch(device, threads)
    raise DamoError(f"unknown latency backend {backend!r}", f"one of {', '.join(BACKENDS)}")


def sample_genomes(
    space: SearchSpace, init: Genome, count: int, seed: int, steps: int = 12
) -> list[Genome]:
    """Random structures of a space: random walks of ``steps`` mutations from ``init``."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        g = init
        for _ in range(rng.randint(1, steps)):
            g = space.mutate(g, rng)
        out.append(g)
    return out


def profile(
    keys: Iterable[OpKey],
    *,
    backend: str = "openvino",
    device: str = "CPU",
    threads: int | None = None,
    repeats: int = 15,
    warmup: int = 3,
    rounds: int = 1,
    progress: Callable[[int, int], None] | None = None,
    meta: dict[str, Any] | None = None,
) -> LatencyTable:
    """Measure each distinct op; entries are net of the runtime's per-call overhead.

    An entry is the difference of two timings (:meth:`_OpenVINO.op_parts`; for torch the
    op's time minus the per-call overhead). With ``rounds > 1`` every op is measured once
    per round (rounds interleave the ops) and the fastest round of *each of the two timings*
    is kept: on a shared machine load spikes only ever add time, so each minimum estimates
    an unloaded time. (The minimum of the *differences* would not: it picks the round where
    the baseline was slowed down, and drove entries to 0.)
    """
    run = runner(backend, device, threads)
    todo = sorted(set(keys))
    overhead = run.overhead(repeats * 2, warmup)
    base: dict[OpKey, float] = {}
    full: dict[OpKey, float] = {}
    done = 0
    for _ in range(max(1, rounds)):
        for key in todo:
            b, f = run.op_parts(key, repeats, warmup)
            base[key] = min(b, base.get(key, b))
            full[key] = min(f, full.get(key, f))
            done += 1
            if progress:
                progress(done, len(todo) * max(1, rounds))
    entries = {key: max(0.0, full[key] - base[key]) for key in todo}
    return LatencyTable(
        backend,
        device,
        threads,
        overhead,
        entries,
        {**run.info(), "rounds": rounds, **(meta or {})},
    )


def measure_backbones(
    structures: Sequence[list[dict[str, Any]]],
    resolution: int,
    *,
    focus: bool = True,
    backend: str = "openvino",
    device: str = "CPU",
    threads: int | None = None,
    repeats: int = 10,
    warmup: int = 2,
    rounds: int = 1,
) -> list[float]:
    """Latency (ms) of each structure's whole deployed backbone, as the builder makes it.

    All backbones are prepared (converted, compiled) first, then timed in ``rounds``
    interleaved rounds; each keeps its fastest round's median (as table entries do), so a
    load spike on a shared machine hits one round, not one structure.
    """
    from damo_plugins.nas.backbone import detector_backbone

    run = runner(backend, device, threads)
    calls = [
        run.prepare_module(
            detector_backbone(st, focus=focus, deploy=True),
            [1, st[0]["in"], resolution, resolution],
        )
        for st in structures
    ]
    best = [math.inf] * len(calls)
    for _ in range(max(1, rounds)):
        for i, call in enumerate(calls):
            best[i] = min(best[i], _median_ms(call, repeats, warmup))
    return best


def calibrate(
    table: LatencyTable,
    analyzer: Analyzer,
    genomes: Sequence[Genome],
    *,
    repeats: int = 10,
    warmup: int = 2,
    rounds: int = 1,
) -> LatencyTable:
    """Measure these backbones on the table's device and fit its :class:`Calibration`."""
    measured = measure_backbones(
        [join(analyzer.bp, g) for g in genomes],
        analyzer.resolution,
        focus=analyzer.focus,
        backend=table.backend,
        device=table.device,
        threads=table.threads,
        repeats=repeats,
        warmup=warmup,
        rounds=rounds,
    )
    return calibrated(table, analyzer, genomes, measured)


def calibrated(
    table: LatencyTable, analyzer: Analyzer, genomes: Sequence[Genome], measured: Sequence[float]
) -> LatencyTable:
    """A copy of ``table`` calibrated on these backbones' measured latencies (ms)."""
    sums, convs = [], []
    for g in genomes:
        total, n, _ = table.table_sum(analyzer.ops(g, deploy=True))
        sums.append(total)
        convs.append(n)
    scale, per_conv, offset = fit_calibration(sums, convs, measured)
    before = [table.overhead_ms + t for t in sums]
    after = [scale * t + per_conv * n + offset for t, n in zip(sums, convs)]
    cal = Calibration(
        scale,
        per_conv,
        offset,
        structures=len(genomes),
        mean_rel_error=mean_rel_error(after, measured),
        mean_rel_error_uncalibrated=mean_rel_error(before, measured),
    )
    return LatencyTable(
        table.backend,
        table.device,
        table.threads,
        table.overhead_ms,
        dict(table.entries),
        {**table.meta, "calibration_measured_ms": [round(m, 4) for m in measured]},
        cal,
    )


def mean_rel_error(predicted: Sequence[float], measured: Sequence[float]) -> float:
    return statistics.fmean(abs(p - m) / m for p, m in zip(predicted, measured))


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties), without scipy."""

    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2.0
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va and vb else float("nan")
