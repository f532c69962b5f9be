"""OpenVINO adapter: devices, compile hints, benchmark, FP16 save, streamed inference, decode graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from torch import nn

from damo_plugins.cli import main
from damo_plugins.core.artifact import load_model, onnx_artifact
from damo_plugins.core.errors import DamoError, UnsupportedError
from damo_plugins.core.manager import get_manager
from damo_plugins.lib.decode import onnx_decode_nodes
from damo_plugins.lib.onnx_export import export_onnx
from tests.adapters.adapter_toys import UpstreamStyleDetector, toy_onnx


@pytest.fixture(scope="module")
def ov_adapter():
    return get_manager().get_adapter("openvino")


@pytest.fixture(scope="module")
def toy_ov(ov_adapter):
    return ov_adapter.convert(toy_onnx(96))


# ------------------------------------------------------------------------- devices
def test_missing_device_lists_available(ov_adapter) -> None:
    available = ov_adapter.devices()
    assert "CPU" in available
    absent = next(d for d in ("NPU", "GPU", "GNA") if d not in available)
    with pytest.raises(
        UnsupportedError, match=rf"'{absent}' is not available.*available here: .*CPU"
    ):
        ov_adapter.check_device(absent)
    with pytest.raises(UnsupportedError, match=absent):
        ov_adapter.check_device(f"AUTO:{absent},CPU")
    assert ov_adapter.check_device("AUTO") == "AUTO"
    assert ov_adapter.check_device("AUTO:CPU") == "AUTO:CPU"


def test_devices_command_shows_device_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "--json"]) == 0
    rows = {r["adapter"]: r for r in json.loads(capsys.readouterr().out)}
    assert "CPU" in rows["openvino"]["devices"]
    assert rows["openvino"]["device_names"]["CPU"]
    assert "quantize" in rows["nncf"]["capabilities"]
    assert "CPUExecutionProvider" in rows["onnxruntime"]["providers"]


# --------------------------------------------------------------- compile / benchmark
def test_compile_with_hint_and_cached_run(ov_adapter, toy_ov) -> None:
    c1 = ov_adapter.compile(toy_ov, "CPU", hint="throughput")
    assert str(c1.get_property("PERFORMANCE_HINT")).endswith("THROUGHPUT")
    assert ov_adapter.compile(toy_ov, "CPU", hint="throughput") is c1  # compiled once, run many
    with pytest.raises(DamoError, match="unknown performance hint"):
        ov_adapter.compile(toy_ov, "CPU", hint="fastest")


def test_compile_options_reach_the_compiled_model(ov_adapter, toy_ov) -> None:
    """Raw OpenVINO ``properties`` pass through; the named options win over them."""
    c = ov_adapter.compile(toy_ov, "CPU", threads=1, properties={"NUM_STREAMS": 1})
    assert int(c.get_property("INFERENCE_NUM_THREADS")) == 1
    assert int(c.get_property("NUM_STREAMS")) == 1
    assert c.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
    c = ov_adapter.compile(
        toy_ov, "CPU", precision="f32", properties={"INFERENCE_PRECISION_HINT": "bf16"}
    )
    assert c.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
    # 'default' (a recipe's spelling of None) leaves the device's own precision
    from damo_plugins.lib.openvino_graph import ov_core

    own = ov_core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    c = ov_adapter.compile(toy_ov, "CPU", precision="default")
    assert c.get_property("INFERENCE_PRECISION_HINT").get_type_name() == own
    with pytest.raises(TypeError, match="unexpected keyword argument 'INFERENCE_PRECISION_HINT'"):
        ov_adapter.compile(toy_ov, "CPU", INFERENCE_PRECISION_HINT="f32")  # no catch-all


def test_benchmark_latency_and_throughput(ov_adapter, toy_ov) -> None:
    lat = ov_adapter.benchmark(toy_ov, "CPU", hint="latency", iterations=8, warmup=1)
    assert lat["count"] == 8 and lat["requests"] == 1
    assert 0 < lat["min_ms"] <= lat["median_ms"] <= lat["p90_ms"] <= lat["max_ms"]
    assert lat["first_inference_ms"] > 0 and lat["compile_ms"] > 0
    thr = ov_adapter.benchmark(toy_ov, "CPU", hint="throughput", iterations=12, warmup=1)
    assert thr["requests"] >= 1 and thr["iterations"] == 12 and thr["fps"] > 0
    assert thr["count"] == 12  # one latency sample per completed request
    with pytest.raises(UnsupportedError, match="not available"):
        ov_adapter.benchmark(toy_ov, "NPU" if "NPU" not in ov_adapter.devices() else "GNA")


def test_save_with_fp16_compression(ov_adapter, tmp_path: Path) -> None:
    art = toy_onnx(64)
    full = ov_adapter.convert(art)
    half = ov_adapter.convert(art, compress_to_fp16=True)
    p32 = full.save(tmp_path / "fp32")
    p16 = half.save(tmp_path / "fp16")
    size32, size16 = p32.with_suffix(".bin").stat().st_size, p16.with_suffix(".bin").stat().st_size
    assert size16 < 0.6 * size32
    loaded = load_model(p16)
    feeds = art.example_inputs()
    ref = art.run(feeds)
    out = loaded.run(feeds)
    # FP16 weights: errors of a few 1e-3 of the output scale (boxes are hundreds of pixels).
    for r, o in zip(ref, out):
        assert np.abs(r - o).max() <= 1e-2 * max(1.0, np.abs(r).max())


# ------------------------------------------------------------------- streamed inference
def test_stream_yields_results_in_order(ov_adapter, toy_ov) -> None:
    rng = np.random.default_rng(0)
    images = [rng.uniform(0, 255, (1, 3, 96, 96)).astype(np.float32) for _ in range(9)]
    streamed = list(ov_adapter.infer_stream(toy_ov, iter(images), max_in_flight=3))
    assert len(streamed) == 9
    for img, outs in zip(images, streamed):
        ref = ov_adapter.run(toy_ov, [img])
        for r, o in zip(ref, outs):
            np.testing.assert_allclose(o, r, rtol=1e-4, atol=1e-3)


class _Features(nn.Module):
    """A small conv whose output (8 x 32 x 32 floats = 32 KB) would show any result leak."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_stream_memory_stays_flat_with_many_images(ov_adapter) -> None:
    art = ov_adapter.convert(load_model(_Features(), input_shape=[1, 3, 32, 32]))
    n = 4000  # 4000 x (12 KB in + 32 KB out) = 176 MB streamed

    def images():
        rng = np.random.default_rng(0)
        for _ in range(n):
            yield rng.uniform(0, 255, (1, 3, 32, 32)).astype(np.float32)

    proc = psutil.Process()
    rss = {}
    count = 0
    checksum = 0.0
    for i, (out,) in enumerate(ov_adapter.infer_stream(art, images(), max_in_flight=4)):
        assert out.shape == (1, 8, 32, 32)
        checksum += float(out[0, 0, 0, 0])
        count += 1
        if i in (500, n - 1):
            rss[i] = proc.memory_info().rss
    assert count == n and np.isfinite(checksum)
    growth_mb = (rss[n - 1] - rss[500]) / 2**20
    assert growth_mb < 25, f"RSS grew by {growth_mb:.1f} MB over {n - 500} images"


# ---------------------------------------------------------------------- decode graph
def test_decode_subgraph_found_structurally_in_onnx_and_openvino(toy_ov) -> None:
    from damo_plugins.lib.openvino_graph import decode_nodes

    proto = toy_onnx(96).model
    names = onnx_decode_nodes(proto)
    types = {n.op_type for n in proto.graph.node if n.name in names}
    assert {"Sigmoid", "Softmax", "MatMul", "Mul", "Sub", "Concat"} <= types
    assert not types & {"Conv"}
    # Renaming every node does not change what is found: the walk is structural.
    for i, node in enumerate(proto.graph.node):
        node.name = f"n{i}"
    assert len(onnx_decode_nodes(proto)) == len(names)
    ov_names = decode_nodes(toy_ov.model)
    ov_types = {
        op.get_type_name()
        for op in toy_ov.model.get_ordered_ops()
        if op.get_friendly_name() in ov_names
    }
    assert {"Sigmoid", "Softmax", "MatMul", "Multiply"} <= ov_types
    assert "Convolution" not in ov_types


def test_classifier_and_feature_outputs_have_no_decode() -> None:
    art = load_model("tiny-cnn")
    assert onnx_decode_nodes(export_onnx(art)) == []


def test_broadcast_fix_keeps_numerics(ov_adapter) -> None:
    from damo_plugins.lib.openvino_graph import broadcast_decode_constants, decode_nodes

    art = onnx_artifact(
        export_onnx(load_model(UpstreamStyleDetector(64), input_shape=[1, 3, 64, 64]))
    )
    model = ov_adapter.convert(art).model
    fixed = model.clone()
    assert broadcast_decode_constants(fixed, decode_nodes(fixed)) >= 1
    feeds = art.example_inputs()
    ref = ov_adapter.run(ov_adapter.convert(art), feeds)
    out = ov_adapter.run(art.derive("openvino", fixed), feeds)
    for r, o in zip(ref, out):
        np.testing.assert_array_equal(r, o)
