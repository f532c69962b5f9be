"""An example third-party adapter: ``eager`` benchmarks a PyTorch model as it is, on the CPU.

It is its own plugin (entry point ``eager = damo_hello.eager`` in ``pyproject.toml``), so it
can be disabled on its own (``DAMO_PLUGINS_DISABLE=eager``).

An adapter declares the options only it understands as one pydantic schema per operation
(``options = {"benchmark": EagerBenchmarkOptions}``) and takes each field as a keyword
argument of that operation. Recipes are checked against the schema when they are validated:
``benchmark: {adapter: eager, threads: 1}`` passes ``damo-opt run --dry-run``, while
``precision: f32`` (an OpenVINO option) is reported there as ``'precision' is an option of
openvino; eager accepts: threads`` instead of being ignored. The parameters every benchmark
takes (``device``, ``iterations``, ``seconds``, ``warmup``) come from ``Adapter.benchmark``.

Importing this module imports neither torch nor any backend: ``damo-opt plugins`` loads every
installed plugin, and ``require_backend`` imports torch when a measurement is asked for.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from damo_plugins import Adapter, ModelArtifact, UnsupportedError, hookimpl


class EagerBenchmarkOptions(BaseModel):
    """The ``eager`` adapter's own benchmark options; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")

    threads: int | None = Field(None, ge=1, description="torch intra-op threads while measuring")


class EagerAdapter(Adapter):
    """Latency of PyTorch models in eager mode, one run at a time."""

    name = "eager"
    backend = "torch"
    backend_distribution = "torch"
    capabilities = ("benchmark",)
    #: one schema per operation; the method takes each field as a keyword argument with the
    #: same default (checked when the class is defined)
    options = {"benchmark": EagerBenchmarkOptions}

    def benchmark(
        self,
        artifact: ModelArtifact,
        device: str = "CPU",
        *,
        iterations: int | None = None,
        seconds: float | None = None,
        warmup: int = 3,
        threads: int | None = None,
    ) -> dict[str, Any]:
        """Latency of ``model(*inputs)`` under ``torch.inference_mode``.

        ``iterations`` runs, or as many as fit in ``seconds`` (at least 3; 5 s when neither is
        given), after ``warmup`` runs that are not counted. The thread count is restored
        afterwards: a benchmark must not change the process it runs in.
        """
        torch = self.require_backend()
        self.check_device(device)
        if artifact.format != "torch":
            raise UnsupportedError(
                f"adapter 'eager' runs PyTorch models, not {artifact.format}",
                "benchmark the model before export, or use --adapter openvino/onnxruntime",
            )
        feeds = [torch.from_numpy(f) for f in artifact.example_inputs()]
        if not feeds:
            raise UnsupportedError(
                "cannot benchmark: the model's input shape is unknown", "give input_shape"
            )
        model = artifact.model.eval()
        before = torch.get_num_threads()
        budget = 5.0 if iterations is None and seconds is None else seconds
        times_ms: list[float] = []
        try:
            if threads is not None:
                torch.set_num_threads(threads)
            used = torch.get_num_threads()
            with torch.inference_mode():
                for _ in range(warmup):
                    model(*feeds)
                start = time.perf_counter()
                while True:
                    t = time.perf_counter()
                    model(*feeds)
                    times_ms.append((time.perf_counter() - t) * 1e3)
                    if iterations is not None and len(times_ms) >= iterations:
                        break
                    elapsed = time.perf_counter() - start
                    if budget is not None and elapsed >= budget and len(times_ms) >= 3:
                        break
        finally:
            torch.set_num_threads(before)
        ordered = sorted(times_ms)
        return {
            "adapter": self.name,
            "backend_version": self.backend_version(),
            "device": device,
            "hint": "latency",
            "threads": used,
            "requests": 1,
            "count": len(times_ms),
            "median_ms": statistics.median(times_ms),
            "p90_ms": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            "min_ms": ordered[0],
            "max_ms": ordered[-1],
        }


@hookimpl
def damo_adapters() -> list[Adapter]:
    return [EagerAdapter()]
