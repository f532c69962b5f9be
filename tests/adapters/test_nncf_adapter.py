"""NNCF adapter: INT8 on OpenVINO and ONNX with the decode kept float, accuracy control, weights."""

from __future__ import annotations

import numpy as np
import pytest

from damo_plugins.core.errors import DamoError
from damo_plugins.core.manager import get_manager
from damo_plugins.data.calibration import generated_images
from damo_plugins.lib.decode import onnx_decode_nodes
from damo_plugins.lib.fidelity import compare_int8, runner
from tests.adapters.adapter_toys import toy_artifact, toy_onnx

SIZE = 96
SHAPE = [1, 3, SIZE, SIZE]


@pytest.fixture(scope="module")
def fp32():
    return toy_onnx(SIZE)


@pytest.fixture(scope="module")
def fp32_ov(fp32):
    """Converted once: the OpenVINO-target tests start from IR, as a recipe after `convert` does."""
    return get_manager().get_adapter("openvino").convert(fp32)


@pytest.fixture(scope="module")
def nncf_adapter():
    return get_manager().get_adapter("nncf")


@pytest.fixture(scope="module")
def calib():
    return generated_images(8, input_shape=SHAPE)


@pytest.fixture(scope="module")
def held():
    return list(generated_images(4, input_shape=SHAPE, seed=99))


def _agreement(fp32, int8, held) -> dict:
    ref, out = runner(fp32), runner(int8)
    return compare_int8([ref([x]) for x in held], [out([x]) for x in held], ["scores", "boxes"])


@pytest.fixture(scope="module")
def int8_ov(nncf_adapter, fp32_ov, calib):
    return nncf_adapter.quantize(fp32_ov, calib, target="openvino", subset_size=8)


def test_openvino_int8_keeps_decode_float_and_agrees(int8_ov, fp32, held) -> None:
    from damo_plugins.lib.openvino_graph import count_types, decode_inputs_quantized, decode_nodes

    model = int8_ov.model
    assert int8_ov.format == "openvino"
    assert count_types(model, "FakeQuantize") >= 5  # the backbone and head convs are INT8
    head = decode_nodes(model)
    assert head and int8_ov.meta["quantization"]["kept_fp"]
    assert decode_inputs_quantized(model, head) == []  # no decode op reads a quantized tensor
    m = _agreement(fp32, int8_ov, held)
    assert m["cosine_min"] > 0.99 and m["top_detection_agreement"] >= 0.7


def test_without_head_policy_the_decode_is_quantized(nncf_adapter, fp32_ov, calib) -> None:
    from damo_plugins.lib.openvino_graph import decode_inputs_quantized, decode_nodes

    q = nncf_adapter.quantize(fp32_ov, calib, target="openvino", subset_size=8, keep_head_fp=False)
    # NNCF on its own puts FakeQuantize in front of the integral MatMul (after the softmax).
    assert decode_inputs_quantized(q.model, decode_nodes(q.model))


def test_onnx_target_gives_qdq_without_decode_quantization(nncf_adapter, fp32, calib, held) -> None:
    q = nncf_adapter.quantize(fp32, calib, target="onnx", subset_size=8)
    graph = q.model.graph
    assert q.format == "onnx" and any(n.op_type == "QuantizeLinear" for n in graph.node)
    producer = {o: n for n in graph.node for o in n.output}
    head = set(onnx_decode_nodes(q.model))
    assert head
    for node in graph.node:
        if node.name in head:
            srcs = [producer[i].op_type for i in node.input if i in producer]
            assert "DequantizeLinear" not in srcs, node.name
    assert _agreement(fp32, q, held)["cosine_min"] > 0.99


def test_accuracy_control_with_a_toy_metric(nncf_adapter, fp32, fp32_ov, calib, held) -> None:
    calls = []

    def metric(compiled, data) -> float:
        # A toy metric: mean top score. NNCF calls it on FP32 and on INT8 variants.
        values = [float(np.asarray(compiled(x)[0]).max()) for x in data]
        calls.append(len(values))
        return float(np.mean(values))

    q = nncf_adapter.quantize(
        fp32_ov,
        calib,
        target="openvino",
        subset_size=8,
        max_drop=0.05,
        validation=held,
        validation_fn=metric,
    )
    assert calls  # the user's validation function drove the search
    assert q.meta["quantization"]["accuracy_control"] is True
    assert _agreement(fp32, q, held)["cosine_min"] > 0.99


def test_accuracy_control_default_metric_is_fp32_agreement(
    nncf_adapter, fp32, fp32_ov, calib, held
) -> None:
    q = nncf_adapter.quantize(
        fp32, calib, target="onnx", subset_size=8, max_drop=0.2, validation=held[:2]
    )
    assert q.format == "onnx"
    with pytest.raises(DamoError, match="needs validation data"):
        nncf_adapter.quantize(fp32_ov, calib, target="openvino", subset_size=8, max_drop=0.1)


def test_weight_only_compression(nncf_adapter, fp32, fp32_ov, calib, held) -> None:
    from damo_plugins.lib.openvino_graph import count_types

    q = nncf_adapter.quantize(fp32_ov, calib, target="openvino", mode="weights")
    assert count_types(q.model, "FakeQuantize") == 0
    int8_consts = [
        op
        for op in q.model.get_ordered_ops()
        if op.get_type_name() == "Constant"
        and op.get_output_element_type(0).get_type_name() in ("i8", "u8")
    ]
    assert int8_consts
    assert _agreement(fp32, q, held)["cosine_min"] > 0.99


def test_clear_errors(nncf_adapter, fp32_ov, calib, int8_ov) -> None:
    with pytest.raises(DamoError, match="ignored scope"):
        nncf_adapter.quantize(
            fp32_ov,
            calib,
            target="openvino",
            subset_size=8,
            ignored_scope={"names": ["no_such_node"]},
        )
    with pytest.raises(DamoError, match="cannot turn an OpenVINO IR into ONNX"):
        nncf_adapter.quantize(int8_ov, calib, target="onnx")
    with pytest.raises(DamoError, match="does not give ONNX"):
        nncf_adapter.quantize(toy_artifact(64), calib, target="onnx", torch_backend=True)
    with pytest.raises(DamoError, match="calibration set is empty"):
        nncf_adapter.quantize(fp32_ov, [], target="openvino")


def test_torch_backend_missing_toolchain_is_a_clear_error(
    nncf_adapter, calib, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a C++ compiler and ninja NNCF's torch path cannot build its extension."""
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(DamoError, match=r"torch_backend.*C\+\+ compiler.*ninja") as err:
        nncf_adapter.quantize(toy_artifact(SIZE), calib, torch_backend=True)
    assert "drop torch_backend" in str(err.value.hint)


@pytest.mark.slow
def test_torch_backend_quantizes_the_module_and_keeps_decode_float(
    nncf_adapter, fp32, calib, held
) -> None:
    """NNCF's own PyTorch path, converted to OpenVINO. The first run on a machine builds
    NNCF's C++ extension (~1 min on an idle core, cached in ~/.cache/torch_extensions)."""
    from damo_plugins.lib.openvino_graph import count_types, decode_inputs_quantized, decode_nodes

    q = nncf_adapter.quantize(toy_artifact(SIZE), calib, subset_size=8, torch_backend=True)
    info = q.meta["quantization"]
    assert q.format == "openvino" and info["torch_backend"]
    kept = info["kept_fp"]  # NNCF torch node names of the decode
    assert any("softmax" in k for k in kept) and any("sigmoid" in k for k in kept)
    assert not any("conv2d" in k for k in kept)
    assert count_types(q.model, "FakeQuantize") >= 5
    # ShapeOf only reads a tensor's shape: harmless on a quantized input.
    quantized = decode_inputs_quantized(q.model, decode_nodes(q.model))
    assert [n for n in quantized if not n.startswith("ShapeOf")] == []
    m = _agreement(fp32, q, held)
    assert m["cosine_min"] > 0.99 and m["top_detection_agreement"] >= 0.7


def _int8_weight_range(model) -> int:
    """The largest |value| of the IR's INT8 weight constants (7-bit weights stay within 64)."""
    top = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Constant" and op.get_element_type().get_type_name() == "i8":
            top = max(top, int(np.abs(op.get_data().astype(np.int16)).max()))
    return top


def test_overflow_fix_follows_the_cpu(nncf_adapter, fp32_ov, calib, int8_ov) -> None:
    """``overflow_fix: auto`` (the default) gives 7-bit weights on a CPU without VNNI, where
    8-bit ones saturate its INT8 kernels' 16-bit sums, and NNCF's first-layer-only fix on a
    VNNI CPU; an explicit choice is kept and reported."""
    from damo_plugins.lib.machine import has_vnni

    auto = int8_ov.meta["quantization"]["overflow_fix"]
    assert auto == ("first_layer_only" if has_vnni() else "enable")
    assert _int8_weight_range(int8_ov.model) <= (127 if has_vnni() else 64)
    first = nncf_adapter.quantize(
        fp32_ov, calib, target="openvino", subset_size=8, overflow_fix="first_layer_only"
    )
    assert first.meta["quantization"]["overflow_fix"] == "first_layer_only"
    assert _int8_weight_range(first.model) > 64  # later layers keep 8-bit weights
    assert has_vnni({"avx2", "avx_vnni"}) and not has_vnni({"avx2", "fma"})
