"""OpenVINO adapter: convert PyTorch/ONNX to IR, read/write IR, compile, run, benchmark.

* devices are named as OpenVINO names them (``CPU``, ``GPU``, ``NPU``, ``AUTO``,
  ``AUTO:GPU,CPU``); one that is not present here is a clear error listing those that are;
* ``compile`` takes a performance hint (``latency`` / ``throughput``);
* ``benchmark`` measures like ``benchmark_app`` (see :mod:`damo_plugins.lib.timing`);
  throughput runs an ``AsyncInferQueue`` under the THROUGHPUT hint;
* :meth:`OpenVINOAdapter.infer_stream` is memory-flat batched inference
  (:mod:`damo_openvino.stream`);
* IR is saved with FP16 weight compression when the artifact asks for it
  (``meta["compress_to_fp16"]``, set by ``convert(..., compress_to_fp16=True)``).

OpenVINO 2026 removed ``openvino.runtime``: everything is imported from ``openvino``.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from damo_plugins.core.adapter import Adapter, AdapterOptions
from damo_plugins.core.artifact import ModelArtifact, check_elements
from damo_plugins.core.errors import DamoError, UnsupportedError
from damo_plugins.lib.openvino_graph import describe_ir, name_ports, ov_core

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

#: ``precision`` values: inference precision of float ops; ``default`` (or ``None`` from
#: Python) leaves the device's own choice, which is bf16 on CPUs with AVX-512 BF16 or AMX
Precision = Literal["f32", "bf16", "f16", "default"]


class OVCompileOptions(AdapterOptions):
    """``compile_model`` settings."""

    hint: Literal["latency", "throughput", "cumulative_throughput"] | None = Field(
        None, description="OpenVINO performance hint (default: the device's)"
    )
    threads: int | None = Field(None, ge=1, description="INFERENCE_NUM_THREADS")
    precision: Precision | None = Field(
        "f32", description="inference precision of float ops ('default': the device's choice)"
    )
    properties: dict[str, Any] | None = Field(
        None, description="further OpenVINO properties by their own names, e.g. NUM_STREAMS"
    )


class OVBenchmarkOptions(AdapterOptions):
    """Benchmark settings (recipe keys of ``benchmark: {adapter: openvino}``)."""

    hint: Literal["latency", "throughput"] = Field(
        "latency",
        description="latency: one request at a time; throughput: AsyncInferQueue under the "
        "THROUGHPUT hint",
    )
    threads: int | None = Field(None, ge=1, description="INFERENCE_NUM_THREADS")
    requests: int | None = Field(
        None, ge=1, description="infer requests in flight (default: the device's optimum)"
    )
    precision: Precision | None = Field(
        "f32", description="inference precision of float ops ('default': the device's choice)"
    )
    streams: int | None = Field(
        None, ge=1, description="NUM_STREAMS (default: what the performance hint chooses)"
    )


class OpenVINOAdapter(Adapter):
    name = "openvino"
    backend = "openvino"
    backend_distribution = "openvino"
    formats = ("openvino",)
    capabilities = ("convert", "compile", "run", "benchmark", "infer_stream")
    options = {"compile": OVCompileOptions, "benchmark": OVBenchmarkOptions}

    def __init__(self) -> None:
        self._compiled: dict[Any, Any] = {}

    def devices(self) -> list[str]:
        self.require_backend()
        return list(ov_core().available_devices)

    def check_device(self, device: str) -> str:
        """Accept a present device, or AUTO/MULTI/HETERO over present devices only."""
        available = self.devices()
        virtual, _, rest = device.partition(":")
        if virtual in ("AUTO", "MULTI", "HETERO", "BATCH"):
            wanted = [d.strip() for d in rest.split(",") if d.strip()]
        else:
            wanted = [device]
        for d in wanted:
            if d not in available and d.split(".")[0] not in available:
                raise UnsupportedError(
                    f"OpenVINO device '{d}' is not available on this machine",
                    f"available here: {', '.join(available) or 'none'} (and AUTO)",
                )
        return device

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if info["version"]:
            names = {}
            for d in info["devices"]:
                try:
                    names[d] = str(ov_core().get_property(d, "FULL_DEVICE_NAME"))
                except Exception:
                    names[d] = "?"
            info["device_names"] = names
        return info

    # -------------------------------------------------------------- convert
    def convert(self, artifact: ModelArtifact, compress_to_fp16: bool = False) -> ModelArtifact:
        ov = self.require_backend()
        try:
            if artifact.format == "torch":
                import torch

                example = tuple(torch.from_numpy(f) for f in artifact.example_inputs())
                if not example:
                    raise DamoError(
                        "cannot convert: the model's input shape is unknown", "give --input-shape"
                    )
                module = artifact.model.eval()
                with torch.no_grad():
                    # Static input shapes from the artifact: without ``input`` the IR gets
                    # dynamic dimensions, which runs slower and hides static-shape folding.
                    shapes = [
                        ov.PartialShape(
                            [d if isinstance(d, int) and d > 0 else -1 for d in t.shape]
                        )
                        for t in artifact.inputs
                    ]
                    model = ov.convert_model(
                        module,
                        example_input=example[0] if len(example) == 1 else example,
                        input=shapes[0] if len(shapes) == 1 else shapes,
                    )
            elif artifact.format == "onnx":
                model = _convert_onnx(ov, artifact)
            elif artifact.format == "openvino":
                return artifact.derive()
            else:
                raise self._unsupported(f"converting {artifact.format} models")
        except DamoError:
            raise
        except Exception as exc:
            first = ov_message(exc)
            raise DamoError(f"OpenVINO could not convert the model: {first[:300]}") from exc
        name_ports(model, artifact)
        out = artifact.derive("openvino", model)
        out.meta["compress_to_fp16"] = compress_to_fp16
        return describe_ir(out, model)

    # ------------------------------------------------------------- files
    def save(self, artifact: ModelArtifact, path: Path) -> Path:
        """Write ``.xml`` + ``.bin`` via a temporary folder, then rename both into place."""
        ov = self.require_backend()
        path = Path(path)
        tmpdir = Path(tempfile.mkdtemp(prefix=".ov-save-", dir=path.parent))
        try:
            tmp_xml = tmpdir / path.name
            ov.save_model(
                artifact.model,
                str(tmp_xml),
                compress_to_fp16=bool(artifact.meta.get("compress_to_fp16")),
            )
            shutil.move(str(tmp_xml.with_suffix(".bin")), str(path.with_suffix(".bin")))
            shutil.move(str(tmp_xml), str(path))
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return path

    def load(self, path: Path) -> ModelArtifact:
        self.require_backend()
        path = Path(path)
        bin_path = path.with_suffix(".bin")
        if not bin_path.exists():
            raise DamoError(f"OpenVINO IR {path} has no weights file {bin_path.name} beside it")
        try:
            model = ov_core().read_model(str(path))
        except Exception as exc:
            first = ov_message(exc)
            raise DamoError(
                f"{path} is not a readable OpenVINO IR: {first[:300]}",
                "the .xml/.bin pair may be corrupt or mismatched; convert the model again",
            ) from exc
        return describe_ir(ModelArtifact("openvino", model), model)

    # ----------------------------------------------------------- compile/run
    def compile(
        self,
        artifact: ModelArtifact,
        device: str = "CPU",
        *,
        hint: str | None = None,
        threads: int | None = None,
        precision: str | None = "f32",
        properties: Mapping[str, Any] | None = None,
    ) -> Any:
        """Compile for ``device`` with an optional ``latency``/``throughput`` hint.

        ``precision`` is the inference precision of floating-point ops. It defaults to
        ``f32``: on CPUs with AVX-512 BF16 or AMX, OpenVINO otherwise runs FP32 models in
        bf16 (errors ~1e-3 of the output scale), which would break parity checks and make an
        "FP32" benchmark silently bf16. ``None`` (or ``"default"``) leaves the device's own
        default. ``properties`` are further OpenVINO properties by their own names; the
        named options win over them.
        """
        self.require_backend()
        self.check_device(device)
        model = artifact.model if artifact.format == "openvino" else self.convert(artifact).model
        props = dict(properties or {})
        props.update(_precision_props(device, precision))
        if hint:
            if hint.lower() not in ("latency", "throughput", "cumulative_throughput"):
                raise DamoError(f"unknown performance hint '{hint}'", "use latency or throughput")
            props["PERFORMANCE_HINT"] = hint.upper()
        if threads:
            props["INFERENCE_NUM_THREADS"] = int(threads)
        key = (id(model), device, tuple(sorted((k, str(v)) for k, v in props.items())))
        cached = self._compiled.get(key)
        if cached is not None and cached[0] is model:
            return cached[1]
        compiled = _compile_model(model, device, props)
        # One entry: enough for "compile once, run many", without pinning old models.
        self._compiled = {key: (model, compiled)}
        return compiled

    def run(
        self, artifact: ModelArtifact, feeds: Sequence[np.ndarray], device: str = "CPU"
    ) -> list[np.ndarray]:
        # Verification runs in f32: on CPUs with AVX512-BF16 (Zen 4, Sapphire Rapids) the CPU
        # plugin's default inference precision is bf16, which differs by ~1e-3.
        import numpy as np

        compiled = self.compile(artifact, device, properties={"INFERENCE_PRECISION_HINT": "f32"})
        result = compiled(list(feeds))
        return [np.asarray(result[out]) for out in compiled.outputs]

    def infer_stream(
        self,
        artifact: ModelArtifact,
        items: Iterable[Any],
        device: str = "CPU",
        max_in_flight: int | None = None,
        hint: str = "throughput",
    ) -> Iterator[list[np.ndarray]]:
        """Memory-flat batched inference: outputs of each item, in order (see ``stream``)."""
        from damo_openvino.stream import infer_stream

        compiled = self.compile(artifact, device, hint=hint)
        return infer_stream(compiled, items, max_in_flight=max_in_flight)

    # ------------------------------------------------------------- benchmark
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
        precision: str | None = "f32",
        streams: int | None = None,
    ) -> dict[str, Any]:
        """Latency (one request at a time) or throughput (``AsyncInferQueue``), like benchmark_app.

        Measured at the artifact's input specs: a dynamic model keeps its dynamic dimensions
        and is fed tensors of those shapes (what ``benchmark_app -data_shape`` does, so the
        model deployed is the model measured); a static dimension that differs is reshaped
        (``-shape``). ``precision`` as in :meth:`compile` (``f32`` by default, ``bf16``, or
        ``None`` / ``"default"`` for the device's default); the precision used is reported.
        ``streams`` sets ``NUM_STREAMS`` over the hint's choice.
        """
        from damo_plugins.lib.timing import check_benchmark_request, measure_latency, summarize_ms

        check_benchmark_request(iterations=iterations, seconds=seconds, warmup=warmup, hint=hint)
        self.require_backend()
        self.check_device(device)
        model = artifact.model if artifact.format == "openvino" else self.convert(artifact).model
        model, shapes, reshaped = _fit_shapes(model, artifact)
        props: dict[str, Any] = {
            "PERFORMANCE_HINT": hint.upper(),
            **_precision_props(device, precision),
        }
        if threads:
            props["INFERENCE_NUM_THREADS"] = int(threads)
        if streams:
            props["NUM_STREAMS"] = int(streams)
        t0 = time.perf_counter()
        compiled = _compile_model(model, device, props)
        compile_ms = (time.perf_counter() - t0) * 1e3
        feeds = _feeds_for(compiled, shapes)
        base = {
            **self._benchmark_header(device, hint, compile_ms),
            "precision": _reported_precision(compiled),
            "reshaped": reshaped,
        }
        with contextlib.suppress(Exception):  # a virtual device may not report it
            base["streams"] = int(compiled.get_property("NUM_STREAMS"))
        import openvino as ov

        # set_input_tensor, not writing into get_input_tensor(): for a dynamic input the
        # request's own tensor is empty (shape 0), and filling it ran batch 0.
        tensors = [ov.Tensor(f) for f in feeds]
        if hint == "latency":
            request = compiled.create_infer_request()
            for i, t in enumerate(tensors):
                request.set_input_tensor(i, t)
            stats = measure_latency(
                request.infer, iterations=iterations, seconds=seconds, warmup=warmup
            )
            return {**base, "requests": 1, **stats, "output_shapes": _output_shapes(request)}
        n = int(requests or compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        queue = ov.AsyncInferQueue(compiled, n)
        for r in range(n):
            for i, t in enumerate(tensors):
                queue[r].set_input_tensor(i, t)
        latencies: list[float] = []
        queue.set_callback(lambda req, start: latencies.append((time.perf_counter() - start) * 1e3))
        t = time.perf_counter()
        queue[0].infer()
        first_ms = (time.perf_counter() - t) * 1e3
        for _ in range(max(1, warmup) * n):
            queue.start_async(userdata=time.perf_counter())
        queue.wait_all()
        latencies.clear()
        budget = seconds if seconds is not None else (None if iterations is not None else 5.0)
        target = iterations if iterations is not None else None
        started = 0
        t_start = time.perf_counter()
        while True:
            if target is not None and started >= target:
                break
            if budget is not None and time.perf_counter() - t_start >= budget and started >= n:
                break
            queue.start_async(userdata=time.perf_counter())
            started += 1
        queue.wait_all()
        elapsed = time.perf_counter() - t_start
        stats = summarize_ms(latencies)
        return {
            **base,
            "requests": n,
            **stats,
            "first_inference_ms": first_ms,
            "fps": started / elapsed,
            "iterations": started,
            "seconds": elapsed,
            "output_shapes": _output_shapes(queue[0]),
        }


def _output_shapes(request: Any) -> list[list[int]]:
    """Shapes of a request's last outputs: proof of the shape really run (a dynamic input
    fed the wrong way runs batch 0 and still times something)."""
    return [list(request.get_output_tensor(i).shape) for i in range(len(request.model_outputs))]


def ov_message(exc: BaseException) -> str:
    """The informative line of an OpenVINO exception.

    OpenVINO prefixes its messages with source locations (``Exception from
    src/inference/...``, ``Check '...' failed at ...``); the cause is the last line.
    """
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception from", "Check '"))]
    return (useful or lines or [type(exc).__name__])[-1][:300]


def _convert_onnx(ov: Any, artifact: ModelArtifact) -> Any:
    """``ov.convert_model`` takes an ONNX *file*, not a ``ModelProto``: go through one."""
    if (
        artifact.path is not None
        and Path(artifact.path).suffix.lower() == ".onnx"
        and Path(artifact.path).is_file()
    ):
        return ov.convert_model(str(artifact.path))
    with tempfile.TemporaryDirectory(prefix="damo-ov-onnx-") as tmp:
        src = Path(tmp) / "model.onnx"
        src.write_bytes(artifact.model.SerializeToString())
        return ov.convert_model(str(src))


def _compile_model(model: Any, device: str, props: Mapping[str, Any]) -> Any:
    """``compile_model`` with OpenVINO's failure turned into one line naming the device."""
    try:
        return ov_core().compile_model(model, device, dict(props))
    except Exception as exc:
        first = ov_message(exc)
        raise DamoError(
            f"OpenVINO could not compile the model for {device}: {first[:300]}"
        ) from exc


def _precision_props(device: str, precision: str | None) -> dict[str, Any]:
    """``INFERENCE_PRECISION_HINT`` for real devices (virtual ones pass it on themselves)."""
    if precision in (None, "default") or device.split(":")[0].split(".")[0] not in (
        "CPU",
        "GPU",
        "NPU",
    ):
        return {}
    return {"INFERENCE_PRECISION_HINT": precision}


def _reported_precision(compiled: Any) -> str:
    try:
        value = compiled.get_property("INFERENCE_PRECISION_HINT")
        return value.get_type_name() if hasattr(value, "get_type_name") else str(value)
    except Exception:
        return "?"


def _fit_shapes(model: Any, artifact: ModelArtifact) -> tuple[Any, list[list[int]], bool]:
    """The model to compile and the concrete input shapes to feed it.

    Shapes come from the artifact's input specs (dynamic entries filled with 1, as
    :meth:`~damo_plugins.core.artifact.TensorSpec.concrete` does; the ``benchmark`` step
    resolves them before it gets here). A model whose *static* dimension differs from the
    wanted shape (a batch-1 IR measured at ``--batch 8``) is reshaped on a clone; one that
    cannot be (a hard-coded Reshape in the graph) is a clear error pointing at a dynamic
    export. Dynamic dimensions are left dynamic.
    """
    shapes: list[list[int]] = []
    conflict = False
    for i, port in enumerate(model.inputs):
        pshape = port.get_partial_shape()
        want = artifact.inputs[i].concrete() if i < len(artifact.inputs) else None
        rank = pshape.rank.get_length() if pshape.rank.is_static else None
        if want is None or (rank is not None and len(want) != rank):
            if not pshape.is_static:
                raise DamoError(
                    f"cannot benchmark: OpenVINO input {i} {pshape} is dynamic and its shape "
                    "is not known",
                    "give --input-shape",
                )
            want = [int(d) for d in pshape.to_shape()]
        for d, w in zip(pshape, want):
            if d.is_static and d.get_length() != w:
                conflict = True
        check_elements(want, f"input {i} of the OpenVINO model")
        shapes.append(want)
    if not conflict:
        return model, shapes, False
    import openvino as ov

    clone = model.clone()
    try:
        clone.reshape({i: ov.PartialShape(s) for i, s in enumerate(shapes)})
    except Exception as exc:
        raise DamoError(
            f"OpenVINO cannot reshape the model to {shapes[0]}: {ov_message(exc)[:200]}",
            "export the model with --dynamic-batch (or --dynamic) to measure other shapes",
        ) from exc
    return clone, shapes, True


def _feeds_for(compiled: Any, shapes: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Seeded random inputs of the given shapes, in the compiled model's input dtypes."""
    import numpy as np

    rng = np.random.default_rng(0)
    feeds = []
    for port, shape in zip(compiled.inputs, shapes):
        dtype = port.get_element_type().to_dtype()
        if np.issubdtype(dtype, np.floating):
            feeds.append((rng.random(list(shape)) * 255).astype(dtype))
        else:
            feeds.append(rng.integers(0, 2, list(shape)).astype(dtype))
    return feeds
