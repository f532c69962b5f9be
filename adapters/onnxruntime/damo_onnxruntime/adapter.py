"""ONNX Runtime adapter: sessions with chosen providers, static QDQ quantization, benchmarks.

Quantization is ONNX Runtime's own: ``quant_pre_process`` (shape inference and graph
optimisation) then ``quantize_static`` in QDQ format, fed by a ``CalibrationDataReader`` over
our calibration sources. Defaults measured on this CPU (AVX2, no VNNI) with DAMO-YOLO-S:
*unsigned* 8-bit activations (``QUInt8``) with signed 8-bit weights gave ~1.9x over FP32,
while ORT's own default (signed activations) gave no speed-up — so ``activation_type``
defaults to ``uint8``. ``CalibMaxIntermediateOutputs`` is never set: it breaks calibration
(``No data is collected``).

The detector decode is excluded from quantization (``nodes_to_exclude``), found
structurally after pre-processing (which may rename or fuse nodes).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from damo_plugins.core.adapter import Adapter, AdapterOptions
from damo_plugins.core.artifact import ModelArtifact, onnx_artifact
from damo_plugins.core.errors import DamoError, UnsupportedError, first_line
from damo_plugins.lib.decode import name_onnx_nodes, onnx_decode_nodes
from damo_plugins.lib.fidelity import as_feeds

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

DEVICE_PROVIDERS = {
    "CPU": ["CPUExecutionProvider"],
    "GPU": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}
#: ONNX Runtime's input type names of float inputs -> numpy dtype names (others: int64)
_ORT_FLOATS = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
}
CALIBRATE = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


class ORTQuantizeOptions(AdapterOptions):
    """``quantize_static`` settings (recipe keys of ``quantize: {adapter: onnxruntime}``)."""

    per_channel: bool = Field(True, description="per-channel weight scales")
    calibrate_method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="how activation ranges are computed from the calibration data"
    )
    activation_type: Literal["uint8", "int8"] = Field(
        "uint8", description="uint8 measured ~1.9x faster than int8 on a CPU without VNNI"
    )
    weight_type: Literal["uint8", "int8"] = "int8"
    reduce_range: bool | None = Field(
        None,
        description="7-bit weights, which avoid the saturation of 8-bit ones in the 16-bit "
        "sums of a CPU without VNNI (measured on the demo model: held-out mAP -0.73 points "
        "with 8-bit, -0.12 with 7-bit); default: on exactly when this CPU has no VNNI",
    )


class ORTCompileOptions(AdapterOptions):
    """``InferenceSession`` settings."""

    providers: list[str] | None = Field(
        None, description="execution providers in order (default: per device)"
    )
    threads: int | None = Field(None, ge=1, description="intra-op threads (default: ORT's)")


class ORTBenchmarkOptions(AdapterOptions):
    """Benchmark settings (recipe keys of ``benchmark: {adapter: onnxruntime}``)."""

    hint: Literal["latency", "throughput"] = Field(
        "latency", description="latency: one run at a time; throughput: parallel runs"
    )
    threads: int | None = Field(
        None, ge=1, description="intra-op threads per session (default: ORT's / cores per run)"
    )
    requests: int | None = Field(
        None, ge=1, description="parallel runs for throughput (default: min(cores, 4))"
    )
    providers: list[str] | None = Field(None, description="execution providers in order")


class ONNXRuntimeAdapter(Adapter):
    name = "onnxruntime"
    backend = "onnxruntime"
    backend_distribution = "onnxruntime"
    formats = ()
    capabilities = ("quantize", "run", "benchmark", "session")
    options = {
        "quantize": ORTQuantizeOptions,
        "compile": ORTCompileOptions,
        "benchmark": ORTBenchmarkOptions,
    }

    def devices(self) -> list[str]:
        ort = self.require_backend()
        return ["CPU"] + (
            ["GPU"] if "CUDAExecutionProvider" in ort.get_available_providers() else []
        )

    def providers(self) -> list[str]:
        return list(self.require_backend().get_available_providers())

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if info["version"]:
            info["providers"] = self.providers()
        return info

    # ---------------------------------------------------------------- session
    def _onnx(self, artifact: ModelArtifact) -> Any:
        if artifact.format == "onnx":
            return artifact.model
        if artifact.format == "torch":
            from damo_plugins.lib.onnx_export import export_onnx

            return export_onnx(artifact)
        raise UnsupportedError(
            f"ONNX Runtime runs ONNX models, not {artifact.format}",
            "export the PyTorch model to ONNX (export step), or use the openvino adapter",
        )

    def compile(
        self,
        artifact: ModelArtifact,
        device: str = "CPU",
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> Any:
        """An ``InferenceSession``; ``providers`` not available here are a clear error listing those that are."""
        from damo_plugins.core.onnx_utils import ort_session

        self.require_backend()
        if providers is None:
            self.check_device(device)
            providers = DEVICE_PROVIDERS.get(device, ["CPUExecutionProvider"])
        return ort_session(self._onnx(artifact), providers=list(providers), threads=threads)

    def run(
        self, artifact: ModelArtifact, feeds: Sequence[np.ndarray], device: str = "CPU"
    ) -> list[np.ndarray]:
        sess = self.compile(artifact, device)
        names = [i.name for i in sess.get_inputs()]
        return list(sess.run(None, dict(zip(names, feeds))))

    # --------------------------------------------------------------- quantize
    def quantize(
        self,
        artifact: ModelArtifact,
        calibration: Iterable[Any],
        *,
        target: str | None = None,
        mode: str = "int8",
        subset_size: int = 300,
        keep_head_fp: bool = True,
        ignored_scope: Mapping[str, Any] | None = None,
        max_drop: float | None = None,
        validation: Iterable[Any] | None = None,
        validation_fn: Callable[..., float] | None = None,
        seed: int = 0,
        per_channel: bool = True,
        calibrate_method: str = "minmax",
        activation_type: str = "uint8",
        weight_type: str = "int8",
        reduce_range: bool | None = None,
    ) -> ModelArtifact:
        """See :meth:`Adapter.quantize`; the ORT options are :class:`ORTQuantizeOptions`.

        ``seed`` is not used (``quantize_static`` is deterministic given the data); accuracy
        control (``max_drop``, ``validation``, ``validation_fn``) is not offered.
        """
        self.require_backend()
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process

        if target not in (None, "onnx"):
            raise UnsupportedError(
                f"ONNX Runtime quantization produces ONNX, not {target}",
                "use --target onnx (OpenVINO runs the QDQ model too), or --adapter nncf for OpenVINO IR",
            )
        if mode != "int8":
            raise UnsupportedError(
                "ONNX Runtime adapter: only static INT8 (mode int8) is offered",
                "use --adapter nncf --mode weights for weight-only compression",
            )
        if max_drop is not None or validation_fn is not None:
            raise UnsupportedError(
                "ONNX Runtime has no accuracy-controlled quantization",
                "use --adapter nncf (or inc) with --max-drop",
            )
        if calibrate_method not in CALIBRATE:
            raise DamoError(
                f"unknown calibration method '{calibrate_method}'", f"one of {', '.join(CALIBRATE)}"
            )
        qtypes = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        if activation_type not in qtypes or weight_type not in qtypes:
            raise DamoError("activation_type and weight_type must be uint8 or int8")
        if reduce_range is None:
            from damo_plugins.lib.machine import has_vnni

            reduce_range = not has_vnni()
        import onnx

        source = onnx.ModelProto()
        source.CopyFrom(self._onnx(artifact))
        name_onnx_nodes(source)
        items = list(calibration)[: max(1, subset_size)]
        if not items:
            raise DamoError("the calibration set is empty", "give a folder or file with samples")
        with tempfile.TemporaryDirectory(prefix="damo-ort-q-") as tmp:
            src, pre, out = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
            from damo_plugins.core.onnx_utils import MAX_ORT_IR_VERSION

            source.ir_version = min(source.ir_version, MAX_ORT_IR_VERSION)
            src.write_bytes(source.SerializeToString())
            try:
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            except Exception:
                # Pre-processing is an optimisation; a model it cannot handle is quantized as is.
                pre = src
            prepared = onnx.load(str(pre))
            name_onnx_nodes(prepared)
            onnx.save(prepared, str(pre))
            head = onnx_decode_nodes(prepared) if keep_head_fp else []
            exclude = set(head)
            user = ignored_scope or {}
            known = {n.name for n in prepared.graph.node}
            missing = [n for n in user.get("names") or [] if n not in known]
            if missing:
                raise DamoError(
                    f"ignored_scope names not in the model: {', '.join(missing[:5])}",
                    "check the node names (after ONNX Runtime pre-processing)",
                )
            exclude |= set(user.get("names") or [])
            types = set(user.get("types") or [])
            if types:
                exclude |= {n.name for n in prepared.graph.node if n.op_type in types}
            if user.get("patterns"):
                import re

                pats = [re.compile(p) for p in user["patterns"]]
                exclude |= {
                    n.name for n in prepared.graph.node if any(p.search(n.name) for p in pats)
                }
            names_in = [
                i.name
                for i in prepared.graph.input
                if i.name not in {x.name for x in prepared.graph.initializer}
            ]
            try:
                quantize_static(
                    str(pre),
                    str(out),
                    calibration_reader(items, names_in),
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    reduce_range=reduce_range,
                    activation_type=qtypes[activation_type],
                    weight_type=qtypes[weight_type],
                    nodes_to_exclude=sorted(exclude),
                    calibrate_method=getattr(CalibrationMethod, CALIBRATE[calibrate_method]),
                )
            except DamoError:
                raise
            except Exception as exc:
                first = first_line(exc)
                raise DamoError(f"ONNX Runtime quantization failed: {first[:300]}") from exc
            quantized = onnx.load(str(out))
        if head:
            _float_decode_inputs(quantized, set(head))
        res = onnx_artifact(
            quantized, provenance=list(artifact.provenance), meta=dict(artifact.meta)
        )
        res.meta["quantization"] = {
            "adapter": self.name,
            "backend_version": self.backend_version(),
            "format": "QDQ",
            "activation_type": activation_type,
            "weight_type": weight_type,
            "per_channel": per_channel,
            "reduce_range": reduce_range,
            "calibrate_method": calibrate_method,
            "calibration_samples": len(items),
            "kept_fp": head,
            "quantize_linear": sum(
                1 for n in quantized.graph.node if n.op_type == "QuantizeLinear"
            ),
        }
        return res

    # -------------------------------------------------------------- benchmark
    def benchmark(
        self,
        artifact: ModelArtifact,
        device: str = "CPU",
        *,
        iterations: int | None = None,
        seconds: float | None = None,
        warmup: int = 3,
        hint: str = "latency",
        threads: int | None = None,
        requests: int | None = None,
        providers: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Latency (one run at a time) or throughput (several runs in parallel threads).

        Measured at the artifact's input specs (the ``benchmark`` step resolves dynamic
        dimensions to the shape asked for). A dynamic ONNX dimension takes that value; a
        static one that differs cannot be changed in ONNX Runtime and is a clear error (an
        export with ``--dynamic-batch`` / ``--dynamic`` can be measured at any shape).
        """
        import os
        from concurrent.futures import ThreadPoolExecutor

        import numpy as np

        from damo_plugins.core.artifact import check_elements
        from damo_plugins.lib.timing import check_benchmark_request, measure_latency, summarize_ms

        check_benchmark_request(iterations=iterations, seconds=seconds, warmup=warmup, hint=hint)
        cores = os.cpu_count() or 1
        n = int(requests or (min(cores, 4) if hint == "throughput" else 1))
        per_thread = threads or (max(1, cores // n) if hint == "throughput" else None)
        t0 = time.perf_counter()
        sess = self.compile(artifact, device, providers=providers, threads=per_thread)
        compile_ms = (time.perf_counter() - t0) * 1e3
        rng = np.random.default_rng(0)
        feeds = {}
        for i, inp in enumerate(sess.get_inputs()):
            declared = list(inp.shape)
            want = artifact.inputs[i].concrete() if i < len(artifact.inputs) else None
            if want is None or len(want) != len(declared):
                want = [d if isinstance(d, int) and d > 0 else 1 for d in declared]
            fixed = [
                (k, d, w)
                for k, (d, w) in enumerate(zip(declared, want))
                if isinstance(d, int) and d > 0 and d != w
            ]
            if fixed:
                k, d, _ = fixed[0]
                what = "batch" if k == 0 else f"dimension {k}"
                raise DamoError(
                    f"cannot benchmark input '{inp.name}' at {want}: the ONNX model has a fixed "
                    f"{what} of {d} {declared}",
                    "ONNX Runtime cannot reshape a model: export it with --dynamic-batch "
                    "(or --dynamic), or benchmark it with --adapter openvino",
                )
            check_elements(want, f"input '{inp.name}'")
            dtype = _ORT_FLOATS.get(inp.type)
            feeds[inp.name] = (
                (rng.random(want) * 255).astype(dtype)
                if dtype is not None
                else rng.integers(0, 2, want).astype(np.int64)
            )
        base = {
            **self._benchmark_header(device, hint, compile_ms),
            "providers": sess.get_providers(),
        }
        infer = lambda: sess.run(None, feeds)  # noqa: E731
        if hint == "latency":
            stats = measure_latency(infer, iterations=iterations, seconds=seconds, warmup=warmup)
            # one more run for the output shapes: proof of the shape really measured
            shapes = [list(np.shape(o)) for o in infer()]
            return {**base, "requests": 1, **stats, "output_shapes": shapes}
        t = time.perf_counter()
        shapes = [list(np.shape(o)) for o in infer()]
        first_ms = (time.perf_counter() - t) * 1e3
        budget = seconds if seconds is not None else (None if iterations is not None else 5.0)
        per_worker = None if iterations is None else max(1, -(-iterations // n))
        for _ in range(warmup):
            infer()

        def worker(deadline: float | None) -> list[float]:
            lat: list[float] = []
            while True:
                t = time.perf_counter()
                infer()
                lat.append((time.perf_counter() - t) * 1e3)
                if per_worker is not None and len(lat) >= per_worker:
                    return lat
                if deadline is not None and time.perf_counter() >= deadline:
                    return lat

        start = time.perf_counter()
        deadline = start + budget if budget is not None else None
        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(worker, [deadline] * n))
        elapsed = time.perf_counter() - start
        lat = [x for r in results for x in r]
        return {
            **base,
            "requests": n,
            "threads_per_request": per_thread,
            **summarize_ms(lat),
            "first_inference_ms": first_ms,
            "fps": len(lat) / elapsed,
            "iterations": len(lat),
            "seconds": elapsed,
            "output_shapes": shapes,
        }


def _float_decode_inputs(model: Any, head: set[str]) -> int:
    """Let the decode read the float outputs of the last convolutions (in place).

    ``quantize_static`` quantizes a Conv's output too, so even with the decode excluded it
    would read 8-bit class and box-bin logits through a Q/DQ pair. We rewire each decode
    input that comes from such a pair to the pair's float input and drop pairs left unused
    — the same boundary NNCF draws. Returns how many inputs were rewired.
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    rewired = 0
    for node in graph.node:
        if node.name not in head:
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue
            node.input[i] = q.input[0]
            rewired += 1
    if rewired:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        changed = True
        while changed:
            changed = False
            for n in list(graph.node):
                if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(
                    o in used for o in n.output
                ):
                    graph.node.remove(n)
                    changed = True
            used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    return rewired


def calibration_reader(items: Sequence[Any], input_names: Sequence[str]) -> Any:
    """An ONNX Runtime ``CalibrationDataReader`` over our calibration items (re-readable).

    Built on call so that importing this adapter does not import ONNX Runtime's quantizer.
    """
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.names = list(input_names)
            self._it = iter(items)

        def get_next(self) -> dict[str, np.ndarray] | None:
            item = next(self._it, None)
            if item is None:
                return None
            return {
                n: np.ascontiguousarray(f, dtype=np.float32)
                for n, f in zip(self.names, as_feeds(item))
            }

        def rewind(self) -> None:
            self._it = iter(items)

        def __len__(self) -> int:
            return len(items)

    return _Reader()
