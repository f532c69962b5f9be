"""Intel Neural Compressor adapter: PT2E INT8 handed to OpenVINO, decode kept float, autotune."""

from __future__ import annotations

import pytest

from damo_plugins.core.errors import DamoError, UnsupportedError
from damo_plugins.core.manager import get_manager
from damo_plugins.data.calibration import generated_images
from damo_plugins.lib.fidelity import compare_int8, runner
from tests.adapters.adapter_toys import toy_artifact, toy_onnx

SIZE = 64
SHAPE = [1, 3, SIZE, SIZE]


@pytest.fixture(scope="module")
def inc_adapter():
    return get_manager().get_adapter("inc")


@pytest.fixture(scope="module")
def fp32():
    return toy_artifact(SIZE)


@pytest.fixture(scope="module")
def calib():
    return generated_images(4, input_shape=SHAPE)


@pytest.fixture(scope="module")
def held():
    return list(generated_images(3, input_shape=SHAPE, seed=99))


@pytest.mark.slow
def test_pt2e_int8_on_openvino_keeps_decode_float(inc_adapter, fp32, calib, held) -> None:
    from damo_plugins.lib.openvino_graph import count_types, decode_inputs_quantized, decode_nodes

    q = inc_adapter.quantize(fp32, calib, subset_size=4)
    assert q.format == "openvino" and q.inputs[0].shape == SHAPE  # static, as the FP32 model
    assert count_types(q.model, "FakeQuantize") >= 5
    kept = q.meta["quantization"]["kept_fp"]
    assert any("softmax" in k for k in kept) and any("sigmoid" in k for k in kept)
    assert decode_inputs_quantized(q.model, decode_nodes(q.model)) == []
    ref, out = runner(fp32), runner(q)
    m = compare_int8([ref([x]) for x in held], [out([x]) for x in held], ["scores", "boxes"])
    assert m["cosine_min"] > 0.99 and m["top_detection_agreement"] >= 0.7


@pytest.mark.slow
def test_autotune_with_a_toy_metric(inc_adapter, fp32, calib, held) -> None:
    seen = []

    def metric(model) -> float:
        import torch

        with torch.no_grad():
            scores, _ = model(torch.from_numpy(held[0]))
        seen.append(float(scores.max()))
        return float(scores.max())

    q = inc_adapter.quantize(
        fp32, calib, subset_size=2, max_drop=0.5, validation_fn=metric, configs=[{}], max_trials=1
    )
    info = q.meta["quantization"]
    tuning = info["autotune"]
    assert len(seen) >= 2 and tuning["baseline"] > 0
    # max_drop is absolute; INC's tolerable loss is relative to the FP32 baseline
    assert tuning["tolerable_loss"] == pytest.approx(0.5 / tuning["baseline"])
    assert info["accuracy_metric"] == "user" and info["metric_drop"] <= 0.5
    assert q.format == "openvino"


def test_onnx_target_exports_a_qdq_model_with_decode_float(inc_adapter, fp32, calib, held) -> None:
    """INC quantizes the PyTorch model; its INT8 GraphModule is exported as ONNX QDQ."""
    from damo_plugins.lib.decode import onnx_decode_nodes

    q = inc_adapter.quantize(fp32, calib, subset_size=2, target="onnx")
    graph = q.model.graph
    assert q.format == "onnx" and q.meta["quantization"]["quantize_linear"] >= 5
    producer = {o: n for n in graph.node for o in n.output}
    head = set(onnx_decode_nodes(q.model))
    assert head and {"Sigmoid", "Softmax"} <= {n.op_type for n in graph.node if n.name in head}
    for node in graph.node:
        if node.name in head:
            srcs = [producer[i].op_type for i in node.input if i in producer]
            assert "DequantizeLinear" not in srcs, node.name
    ref, out = runner(fp32), runner(q)  # ONNX Runtime runs it
    m = compare_int8([ref([x]) for x in held], [out([x]) for x in held], ["scores", "boxes"])
    assert m["cosine_min"] > 0.99 and m["top_detection_agreement"] >= 0.7


def test_zero_baseline_is_a_clear_error(inc_adapter, fp32, calib) -> None:
    with pytest.raises(DamoError, match="positive baseline"):
        inc_adapter.quantize(fp32, calib, subset_size=1, max_drop=0.01, validation_fn=lambda m: 0.0)


def test_tuning_options_without_max_drop_are_an_error(inc_adapter, fp32, calib) -> None:
    """``configs``/``max_trials`` only shape autotune: without ``max_drop`` they would be ignored."""
    with pytest.raises(DamoError, match=r"configs and max_trials .* need max_drop"):
        inc_adapter.quantize(fp32, calib, configs=[{"act_algo": "kl"}])
    with pytest.raises(DamoError, match="need max_drop"):
        inc_adapter.quantize(fp32, calib, max_trials=3)


def test_onnx_and_ir_inputs_point_elsewhere(inc_adapter, calib) -> None:
    onnx_art = toy_onnx(SIZE)
    with pytest.raises(
        UnsupportedError, match=r"no longer quantizes ONNX.*nncf or --adapter onnxruntime"
    ):
        inc_adapter.quantize(onnx_art, calib)
    ov_art = get_manager().get_adapter("openvino").convert(onnx_art)
    with pytest.raises(UnsupportedError, match="adapter nncf for OpenVINO IR"):
        inc_adapter.quantize(ov_art, calib)
