"""ONNX Runtime adapter: QDQ quantization with the decode excluded, providers, benchmark."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from damo_plugins.core.errors import DamoError, UnsupportedError
from damo_plugins.core.manager import get_manager
from damo_plugins.data.calibration import generated_images
from damo_plugins.lib.decode import onnx_decode_nodes
from damo_plugins.lib.fidelity import compare_int8, runner
from tests.adapters.adapter_toys import toy_onnx

SIZE = 96
SHAPE = [1, 3, SIZE, SIZE]


@pytest.fixture(scope="module")
def ort_adapter():
    return get_manager().get_adapter("onnxruntime")


@pytest.fixture(scope="module")
def fp32():
    return toy_onnx(SIZE)


@pytest.fixture(scope="module")
def calib():
    return generated_images(8, input_shape=SHAPE)


@pytest.fixture(scope="module")
def held():
    return list(generated_images(4, input_shape=SHAPE, seed=99))


@pytest.fixture(scope="module")
def int8(ort_adapter, fp32, calib):
    return ort_adapter.quantize(fp32, calib, subset_size=8)


def _decode_reads_dequantized(model: onnx.ModelProto) -> list[str]:
    producer = {o: n for n in model.graph.node for o in n.output}
    head = set(onnx_decode_nodes(model))
    return [
        n.name
        for n in model.graph.node
        if n.name in head
        and any(producer[i].op_type == "DequantizeLinear" for i in n.input if i in producer)
    ]


def test_qdq_int8_keeps_decode_float_and_agrees(int8, fp32, held) -> None:
    graph = int8.model.graph
    qs = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert qs and int8.meta["quantization"]["kept_fp"]
    # Unsigned 8-bit activations (the fast choice on this CPU): zero points are uint8.
    inits = {i.name: i for i in graph.initializer}
    zp = [inits[q.input[2]] for q in qs if len(q.input) > 2 and q.input[2] in inits]
    assert zp and all(z.data_type == onnx.TensorProto.UINT8 for z in zp)
    assert _decode_reads_dequantized(int8.model) == []
    ref, out = runner(fp32), runner(int8)
    m = compare_int8([ref([x]) for x in held], [out([x]) for x in held], ["scores", "boxes"])
    assert m["cosine_min"] > 0.99 and m["top_detection_agreement"] >= 0.7


def test_without_head_policy_the_decode_is_quantized(ort_adapter, fp32, calib) -> None:
    q = ort_adapter.quantize(fp32, calib, subset_size=8, keep_head_fp=False, per_channel=False)
    assert _decode_reads_dequantized(q.model)


def test_other_calibration_methods_and_user_exclusions(ort_adapter, fp32, calib) -> None:
    q = ort_adapter.quantize(
        fp32, calib, subset_size=4, calibrate_method="percentile", ignored_scope={"types": ["Conv"]}
    )
    # Every Conv excluded by the user: no weight is quantized any more.
    assert q.meta["quantization"]["calibrate_method"] == "percentile"
    convs = [n for n in q.model.graph.node if n.op_type == "Conv"]
    producer = {o: n for n in q.model.graph.node for o in n.output}
    assert convs and all(
        producer.get(c.input[1]) is None or producer[c.input[1]].op_type != "DequantizeLinear"
        for c in convs
    )


def test_openvino_runs_the_qdq_model(int8, fp32, held) -> None:
    ov_adapter = get_manager().get_adapter("openvino")
    ov_int8 = ov_adapter.convert(int8)
    from damo_plugins.lib.openvino_graph import count_types

    assert count_types(ov_int8.model, "FakeQuantize") > 0
    ref, out = runner(fp32), runner(ov_int8)
    m = compare_int8([ref([x]) for x in held], [out([x]) for x in held], ["scores", "boxes"])
    assert m["cosine_min"] > 0.99


def test_providers_and_clear_errors(ort_adapter, fp32, calib) -> None:
    with pytest.raises(
        DamoError,
        match=r"not available here: TensorrtExecutionProvider.*available: .*CPUExecutionProvider",
    ):
        ort_adapter.compile(fp32, providers=["TensorrtExecutionProvider"])
    with pytest.raises(UnsupportedError, match="no accuracy-controlled"):
        ort_adapter.quantize(fp32, calib, max_drop=0.01)
    with pytest.raises(UnsupportedError, match="no accuracy-controlled"):
        ort_adapter.quantize(fp32, calib, validation_fn=lambda *_: 1.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'preset'"):
        ort_adapter.quantize(fp32, calib, preset="mixed")  # NNCF's: never silently dropped
    with pytest.raises(TypeError, match="unexpected keyword argument 'precision'"):
        ort_adapter.benchmark(fp32, precision="f32")  # OpenVINO's
    with pytest.raises(UnsupportedError, match="produces ONNX"):
        ort_adapter.quantize(fp32, calib, target="openvino")
    with pytest.raises(DamoError, match="unknown calibration method"):
        ort_adapter.quantize(fp32, calib, calibrate_method="magic")
    with pytest.raises(DamoError, match=r"ignored_scope names not in the model: nope"):
        ort_adapter.quantize(fp32, calib, subset_size=2, ignored_scope={"names": ["nope"]})


def test_benchmark(ort_adapter, int8) -> None:
    lat = ort_adapter.benchmark(int8, hint="latency", iterations=5, warmup=1)
    assert (
        lat["count"] == 5 and lat["median_ms"] > 0 and lat["providers"] == ["CPUExecutionProvider"]
    )
    thr = ort_adapter.benchmark(int8, hint="throughput", iterations=8, warmup=1, requests=2)
    assert thr["requests"] == 2 and thr["iterations"] >= 8 and thr["fps"] > 0


def _int8_weight_range(model: onnx.ModelProto) -> int:
    """The largest |value| of the QDQ graph's INT8 weight initializers."""
    from onnx import numpy_helper

    top = 0
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.INT8 and len(init.dims) == 4:
            top = max(top, int(np.abs(numpy_helper.to_array(init).astype(np.int16)).max()))
    return top


def test_reduce_range_follows_the_cpu(ort_adapter, fp32, calib, int8) -> None:
    """By default the weights are 7-bit exactly when this CPU has no VNNI (8-bit weights
    saturate its 16-bit sums); an explicit choice is kept and reported."""
    from damo_plugins.lib.machine import has_vnni

    seven = not has_vnni()
    assert int8.meta["quantization"]["reduce_range"] is seven
    assert _int8_weight_range(int8.model) <= (64 if seven else 127)
    full = ort_adapter.quantize(fp32, calib, reduce_range=False)
    assert full.meta["quantization"]["reduce_range"] is False
    assert _int8_weight_range(full.model) > 64
