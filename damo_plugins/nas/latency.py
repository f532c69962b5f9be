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

Backends: ``openvino`` (``import openvino as ov``; the op is built directly with an opset,
the backbone converted with ``ov.convert_model``) and ``torch`` (eager, inference mode).
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

from damo_plugins.errors import DamoError
from damo_plugins.nas.analysis import Analyzer, ConvOp, Genome
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


@dataclass
class LatencyTable:
    """Measured per-convolution latencies (ms, overhead removed) of one device."""

    backend: str
    device: str
    threads: int | None
    overhead_ms: float
    entries: dict[OpKey, float]
    meta: dict[str, Any] = field(default_factory=dict)

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

    def predict_ops(self, ops: Iterable[ConvOp]) -> tuple[float, int]:
        """Predicted latency (ms) of a network made of ``ops``, and the count of estimated ops."""
        total = self.overhead_ms
        missing = 0
        for op in ops:
            ms, est = self.op_ms(op_key(op))
            total += ms * op[6]
            missing += est
        return total, missing

    def predict(self, analyzer: Analyzer, genome: Genome) -> float:
        return self.predict_ops(analyzer.ops(genome))[0]

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
            "entries": {key_str(k): round(v, 6) for k, v in sorted(self.entries.items())},
        }

    def save(self, path: str | Path) -> Path:
        from damo_plugins.io import write_bytes

        return write_bytes(path, (json.dumps(self.to_json(), indent=1) + "\n").encode())

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        from damo_plugins.io import check_input_file

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
        return cls(
            str(data.get("backend")),
            str(data.get("device")),
            data.get("threads"),
            float(data.get("overhead_ms", 0.0)),
            entries,
            dict(data.get("meta") or {}),
        )


# ---------------------------------------------------------------------- measurement
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

    def _time(self, model: Any, shape: Sequence[int], repeats: int, warmup: int) -> float:
        import numpy as np

        compiled = self.core.compile_model(model, self.device, self.config)
        req = compiled.create_infer_request()
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        req.set_input_tensor(self.ov.Tensor(x))
        return _median_ms(req.infer, repeats, warmup)

    def op(self, key: OpKey, repeats: int, warmup: int) -> float:
        """Latency of one conv *inside* a network, by difference of two models.

        A one-conv model pays for layout/precision conversions at its input and output
        (on a CPU with bf16 these cost more than a small conv), which a conv inside a
        backbone does not. So we time ``relu(conv(x))`` and ``relu(conv(x) + conv'(x))``:
        both have the same input and output tensors, and the second has exactly one more
        conv (the add fuses into it), so the difference is that conv's cost in context.
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
        t1 = self._time(one, [1, cin, h, h], repeats, warmup)
        t2 = self._time(two, [1, cin, h, h], repeats, warmup)
        return max(0.0, t2 - t1) + self._overhead_ms

    def overhead(self, repeats: int, warmup: int) -> float:
        import openvino.opset13 as ops

        p = ops.parameter([1, 8, 4, 4], self.ov.Type.f32)
        self._overhead_ms = self._time(
            self.ov.Model([ops.relu(p)], [p]), [1, 8, 4, 4], repeats, warmup
        )
        return self._overhead_ms

    def module(self, net: Any, shape: Sequence[int], repeats: int, warmup: int) -> float:
        import torch

        model = self.ov.convert_model(net, example_input=torch.zeros(*shape))
        return self._time(model, shape, repeats, warmup)


class _Torch:
    def __init__(self, device: str, threads: int | None) -> None:
        import torch

        if device.upper() != "CPU":
            raise DamoError(f"the torch latency backend measures CPU only, not {device!r}")
        self.torch = torch
        if threads:
            torch.set_num_threads(int(threads))

    def info(self) -> dict[str, Any]:
        return {"torch": self.torch.__version__, "threads": self.torch.get_num_threads()}

    def _time(self, net: Any, shape: Sequence[int], repeats: int, warmup: int) -> float:
        torch = self.torch
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        net.eval()

        def run() -> None:
            with torch.inference_mode():
                net(x)

        return _median_ms(run, repeats, warmup)

    def op(self, key: OpKey, repeats: int, warmup: int) -> float:
        nn = self.torch.nn
        cin, cout, k, s, h = key
        return self._time(
            nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2), nn.ReLU()),
            [1, cin, h, h],
            repeats,
            warmup,
        )

    def overhead(self, repeats: int, warmup: int) -> float:
        return self._time(self.torch.nn.ReLU(), [1, 8, 4, 4], repeats, warmup)

    def module(self, net: Any, shape: Sequence[int], repeats: int, warmup: int) -> float:
        return self._time(net, shape, repeats, warmup)


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

    With ``rounds > 1`` every op is measured once per round (rounds interleave the ops) and
    the fastest round is kept: on a shared machine, load spikes only ever add time.
    """
    run = runner(backend, device, threads)
    todo = sorted(set(keys))
    overhead = run.overhead(repeats * 2, warmup)
    entries: dict[OpKey, float] = {}
    done = 0
    for _ in range(max(1, rounds)):
        for key in todo:
            ms = max(0.0, run.op(key, repeats, warmup) - overhead)
            entries[key] = min(ms, entries.get(key, ms))
            done += 1
            if progress:
                progress(done, len(todo) * max(1, rounds))
    return LatencyTable(
        backend,
        device,
        threads,
        overhead,
        entries,
        {**run.info(), "rounds": rounds, **(meta or {})},
    )


def measure_backbone(
    structure: list[dict[str, Any]],
    resolution: int,
    *,
    focus: bool = True,
    backend: str = "openvino",
    device: str = "CPU",
    threads: int | None = None,
    repeats: int = 10,
    warmup: int = 2,
) -> float:
    """Median latency (ms) of the whole plain backbone (BN folded into conv biases)."""
    from damo_plugins.nas.backbone import PlainBackbone

    net = PlainBackbone(
        structure, focus=focus, bn=False, bias=True, out_indices=(len(structure) - 1,)
    ).eval()
    return runner(backend, device, threads).module(
        net, [1, structure[0]["in"], resolution, resolution], repeats, warmup
    )


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
