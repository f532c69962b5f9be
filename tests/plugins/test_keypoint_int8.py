"""INT8 Keypoint R-CNN (issue 18, items 6-7): NNCF on the backbone of the exported whole-model
graph, everything after the box selection float, fidelity against FP32 on images the
quantizer never saw -- detections and FPN feature maps -- in OpenVINO and, through NNCF's
ONNX backend (a QDQ graph), in ONNX Runtime.

Real OpenVINO, NNCF and ONNX Runtime on the small 8-channel test model of
``test_keypoint_rcnn.py``. Tolerances, from measurements on this model with a margin: at
least 70 % of the FP32 detections matched (same class, IoU >= 0.5), matched boxes
IoU >= 0.995, scores within 0.01, keypoints within 0.05 px; FPN maps cosine >= 0.999 and
SNR >= 25 dB. Measured with OpenVINO compiled for a fixed input shape and in ONNX Runtime:
12 of 12 FP32 detections matched (one extra INT8 detection, score 0.051, a threshold flip),
IoU 0.99995, |dscore| <= 1.7e-3, keypoints <= 3.5e-3 px, FPN SNR 32-43 dB. With the dynamic
shape OpenVINO 2026.4.1 returns zeros for FPN levels 3-5 on this AVX2 machine (10 of 12
matched, 7 extra detections): see ``test_int8_fpn_maps_stay_close_to_fp32``.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
import openvino as ov
import pytest
import torch

from damo_plugins.core.artifact import ModelArtifact
from damo_plugins.core.errors import DamoError
from damo_plugins.keypoints import int8
from damo_plugins.keypoints.export import export_keypoint_model
from damo_plugins.lib.fidelity import quantized_ops

from .test_keypoint_rcnn import tiny_model


def noise_images(seed: int, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(1, 3, h, w, generator=g) * 255).numpy() for h, w in sizes]


CALIB = noise_images(11, [(128, 160), (112, 144), (160, 128), (96, 200)] * 2 + [(100, 100)])
HELD_OUT = noise_images(3, [(128, 160), (96, 200), (150, 97)])  # seeds and sizes differ


@pytest.fixture(scope="module")
def proto() -> onnx.ModelProto:
    """The small model's whole-model FP32 graph."""
    return export_keypoint_model(tiny_model(), opset=17)


@pytest.fixture(scope="module")
def exported(proto, tmp_path_factory) -> tuple[onnx.ModelProto, ov.Model, dict, dict]:
    """The small model exported, quantized and written as IR by ``export_int8`` (the
    function behind ``damo-opt keypoints export --full --int8``): 9 calibration images, the
    last 3 of the 12 held out for the fidelity check. Returns the IR read back from disk."""
    out = tmp_path_factory.mktemp("int8") / "kp_int8.xml"
    info, fidelity = int8.export_int8(proto, CALIB + HELD_OUT, out)
    assert out.with_suffix(".bin").is_file()
    return proto, ov.Core().read_model(str(out)), info, fidelity


# ------------------------------------------------------------------- the metrics
def detections(boxes, scores, kps, classes=None) -> list[np.ndarray]:
    boxes = np.asarray(boxes, np.float32)
    classes = np.zeros(len(boxes), np.int64) if classes is None else np.asarray(classes)
    return [boxes, np.asarray(scores, np.float32), classes, np.asarray(kps, np.float32)]


def test_fidelity_metrics_see_moves_losses_and_classes() -> None:
    boxes = [[0, 0, 10, 20], [30, 30, 60, 90]]
    kps = np.zeros((2, 3, 3))
    kps[..., :2] = [[5, 5], [2, 8], [7, 15]]
    ref = detections(boxes, [0.9, 0.6], kps)
    same = int8.int8_fidelity([ref], [ref])
    assert same["recall"] == same["precision"] == same["mean_iou"] == 1.0
    assert same["kp_max_px"] == 0.0 and same["unmatched_max_score"] == 0.0

    moved = kps.copy()
    moved[1, 2, 0] += 3.0  # one keypoint 3 px right
    m = int8.int8_fidelity([ref], [detections(boxes, [0.9, 0.6], moved)])
    assert m["kp_max_px"] == pytest.approx(3.0) and m["kp_within_2px"] == pytest.approx(5 / 6)

    lost = int8.int8_fidelity([ref], [detections(boxes[:1], [0.9], kps[:1])])
    assert lost["recall"] == 0.5 and lost["precision"] == 1.0
    assert lost["unmatched_max_score"] == pytest.approx(0.6)

    other_class = int8.int8_fidelity([ref], [detections(boxes, [0.9, 0.6], kps, [1, 1])])
    assert other_class["matched"] == 0.0 and other_class["recall"] == 0.0

    shifted = int8.int8_fidelity(
        [ref], [detections([[0, 0, 10, 20], [45, 30, 75, 90]], [0.9, 0.6], kps)]
    )
    assert shifted["matched"] == 1.0  # IoU 1/3 < 0.5: the shifted box is not the same object

    empty = detections(np.zeros((0, 4)), [], np.zeros((0, 3, 3)))
    assert int8.int8_fidelity([empty], [empty])["recall"] == 1.0
    bad = int8.fidelity_failures(lost)
    assert bad and "recall 0.500" in bad[0]
    assert int8.fidelity_failures(same) == []


# --------------------------------------------------------------- the quantized graph
def test_only_the_backbone_is_int8(exported) -> None:
    """Counted in the graph: quantized ops exist, every FakeQuantize feeds a convolution that
    computes the pooled features, and nothing after TopK / NMS / NonZero / ROIAlign (nor the
    RPN head) is quantized."""
    proto, model, info, _ = exported
    assert info["calibration_images"] == 9 and info["held_out_images"] == 3, info
    counts = quantized_ops(ModelArtifact("openvino", model))
    assert counts["quantized_ops"] > 0, counts
    assert info["quantized_layers"] == info["backbone_layers"] == 4, info  # stem, down.0..2
    targets = int8.fake_quantize_targets(model)
    fp32 = int8.to_openvino(proto)
    features, sparse = int8.feature_ops(fp32), int8.sparse_ops(fp32)
    assert set(targets) <= features - sparse, sorted(targets)
    assert all(name.startswith("/backbone/") for name in targets), sorted(targets)
    types = {op.get_friendly_name(): op.get_type_name() for op in model.get_ordered_ops()}
    assert {types[n] for n in targets} == {"Convolution"}
    # no quantizer on the inputs of the float tail
    for op in model.get_ordered_ops():
        if op.get_type_name() in int8.SELECTION_OPS | {"MatMul"}:
            srcs = {p.get_source_output().get_node().get_type_name() for p in op.inputs()}
            assert "FakeQuantize" not in srcs, op.get_friendly_name()


@pytest.mark.slow
def test_int8_with_a_fixed_input_shape_matches_fp32(proto, exported) -> None:
    """The written IR compiled per held-out image size with the shape fixed: the CLI's
    detection bounds (recall and precision >= 0.9) and keypoints within 0.05 px. Six
    compilations of the whole graph: ~20 s on the shared machine, hence ``slow``."""
    m = int8.compare_int8_model(proto, exported[1], HELD_OUT, threads=1, static=True)
    assert m["fp32_detections"] >= 5 and m["recall"] >= 0.9 and m["precision"] >= 0.9, m
    assert m["mean_iou"] >= 0.995 and m["max_dscore"] <= 0.01 and m["kp_max_px"] <= 0.05, m


def test_int8_matches_fp32_on_held_out_images(exported) -> None:
    """Fidelity measured by ``export_int8`` on the 3 images calibration did not see (dynamic
    shape: levels 3-5 may be miscomputed by OpenVINO, the small boxes pool from level 2)."""
    m = exported[3]
    assert m["images"] == 3.0 and m["fp32_detections"] >= 5, m
    assert m["matched"] >= 0.7 * m["fp32_detections"], m
    assert m["mean_iou"] >= 0.995, m
    assert m["max_dscore"] <= 0.01, m
    assert m["kp_max_px"] <= 0.05, m


def test_feature_fidelity_is_cosine_and_snr_per_fpn_level() -> None:
    """Exact cases: a map scaled by 1.1 keeps cosine 1 and has SNR 10 log10(1 / 0.1^2) =
    20 dB; a negated map has cosine -1 and SNR 10 log10(1 / 4) = -6.02 dB. Levels are named
    by stride (64 px image, 16 px map: stride 4 = p2)."""
    rng = np.random.default_rng(0)
    image = np.zeros((1, 3, 64, 64), np.float32)
    p2, p3 = rng.normal(size=(1, 4, 16, 16)), rng.normal(size=(1, 4, 8, 8))
    m = int8.feature_fidelity(lambda x: [p2, p3], lambda x: [1.1 * p2, -p3], [image, image])
    assert m["p2_cos"] == pytest.approx(1.0, abs=1e-12)
    assert m["p2_snr_db"] == pytest.approx(20.0, abs=1e-9)
    assert m["p3_cos"] == pytest.approx(-1.0, abs=1e-12)
    assert m["p3_snr_db"] == pytest.approx(-6.0206, abs=1e-4)
    assert m["min_cos"] == m["p3_cos"] and m["min_snr_db"] == m["p3_snr_db"]
    same = int8.feature_fidelity(lambda x: [p2], lambda x: [p2], [image])
    assert same["p2_cos"] == pytest.approx(1.0) and same["p2_snr_db"] == float("inf")
    with pytest.raises(DamoError, match="differ"):
        int8.feature_fidelity(lambda x: [p2], lambda x: [p3], [image])


def test_int8_fpn_maps_stay_close_to_fp32(exported) -> None:
    """The FPN maps of the INT8 IR on the held-out images, measured by ``export_int8``.

    With the input shape fixed (``static_*``): measured cosine >= 0.9997 and SNR >= 31.9 dB on
    every level of this model; bounds cosine >= 0.999 and SNR >= 25 dB (an error of 6 % of
    the maps' RMS). As a plain ``compile_model`` runs it (dynamic shape), OpenVINO 2026.4.1
    returned zeros for levels p3-p5 on this AVX2 machine (``_openvino_runner``): then the
    CLI's bounds must reject the model and name the fix; otherwise the maps must be as close.
    """
    m = exported[3]
    assert len([k for k in m if k.startswith("p") and k.endswith("_snr_db")]) == 4, m
    assert m["static_min_cos"] >= 0.999 and m["static_min_snr_db"] >= 25.0, m
    if m["min_snr_db"] >= 25.0:
        assert m["min_cos"] >= 0.999, m
    else:
        bad = int8.fidelity_failures(m)
        assert any("static input shape" in b and "reshape" in b for b in bad), bad


def test_static_compile_fixes_an_int8_input_shared_with_another_op() -> None:
    """The smallest graph of OpenVINO's dynamic-shape INT8 problem: FakeQuantize -> Conv ->
    [Result, FakeQuantize -> Conv -> Result], 7-bit weights. ``openvino_f32(static=True)``
    must match a float emulation (FakeQuantize in numpy, convolutions in torch) on outputs of
    magnitude up to ~5: mean |error| <= 0.01 and max <= 0.05. The INT8 kernel rounds the
    asymmetric grid's zero point to an integer, which the emulation does not: a shift of up
    to half a level (2.2 / 255 / 2) on every input; measured mean 1.6e-3, max 4.4e-3. With
    the dynamic shape OpenVINO
    2026.4.1 returned all zeros for the second output here (not asserted: a fixed
    OpenVINO may get it right)."""
    ops = ov.opset13
    rng = np.random.default_rng(0)
    x = ops.parameter([1, 8, -1, -1], np.float32, name="x")
    h, outs, ref_w, ranges = x, [], [], [(-1.0, 1.2), (-0.5, 0.6)]
    for lo, hi in ranges:
        a = ops.fake_quantize(
            h, np.float32(lo), np.float32(hi), np.float32(lo), np.float32(hi), 256
        )
        wq = rng.integers(-63, 64, (8, 8, 3, 3)).astype(np.int8)
        scale = np.full((8, 1, 1, 1), 1e-2, np.float32)
        w = ops.multiply(ops.convert(ops.constant(wq), np.float32), ops.constant(scale))
        h = ops.convolution(a, w, [1, 1], [1, 1], [1, 1], [1, 1])
        outs.append(h)
        ref_w.append(torch.from_numpy(wq.astype(np.float32) * scale))
    model = ov.Model([ops.result(o) for o in outs], [x])
    image = rng.uniform(-1, 1.2, (1, 8, 24, 32)).astype(np.float32)

    def fq(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
        levels = np.round((np.clip(a, lo, hi) - lo) / (hi - lo) * 255)
        return (levels / 255 * (hi - lo) + lo).astype(np.float32)

    ref, t = [], image
    for (lo, hi), w in zip(ranges, ref_w):
        t = torch.nn.functional.conv2d(torch.from_numpy(fq(np.asarray(t), lo, hi)), w, padding=1)
        t = t.numpy()
        ref.append(t)
    got = int8.openvino_f32(model, threads=1, static=True)(image)
    for r, g in zip(ref, got):
        err = np.abs(np.asarray(g) - r)
        assert np.abs(r).max() > 1.0
        assert err.mean() <= 0.01 and err.max() <= 0.05, (err.mean(), err.max())


@pytest.fixture(scope="module")
def onnx_int8(proto) -> tuple[onnx.ModelProto, dict]:
    """The ONNX Runtime form: NNCF's ONNX backend on the same graph and calibration images."""
    return int8.quantize_onnx_keypoint_rcnn(proto, CALIB)


def test_onnx_int8_quantizes_only_the_backbone(proto, onnx_int8) -> None:
    """QDQ-fed convolutions counted in the ONNX graph: the 4 feature convolutions, nothing
    else; no DequantizeLinear feeds a RoiAlign, TopK, NMS or MatMul."""
    q, info = onnx_int8
    assert info["quantized_layers"] == info["backbone_layers"] == 4, info
    convs = int8.qdq_convs(q)
    assert len(convs) == 4 and all(n.startswith("/backbone/") for n in convs), convs
    producer = {out: n.op_type for n in q.graph.node for out in n.output}
    for node in q.graph.node:
        if node.op_type in int8.ONNX_SELECTION_OPS | {"MatMul", "Gemm"}:
            assert "DequantizeLinear" not in {producer.get(t) for t in node.input}, node.name
    onnx.checker.check_model(q)
    assert len(q.graph.output) == len(proto.graph.output)


def test_onnx_int8_matches_fp32_in_onnx_runtime(proto, onnx_int8) -> None:
    """Held-out images in ONNX Runtime, the same bounds as the OpenVINO form: detections
    (>= 70 % matched, IoU >= 0.995, |dscore| <= 0.01, keypoints <= 0.05 px) and FPN maps
    (cosine >= 0.999, SNR >= 25 dB). Measured: 12 of 12 matched, keypoints <= 3.4e-3 px,
    FPN maps cosine >= 0.9997, SNR >= 32 dB."""
    from damo_plugins.core.onnx_utils import ort_session

    q, _ = onnx_int8
    ref_sess, q_sess = ort_session(proto, threads=1), ort_session(q, threads=1)
    ref = [ref_sess.run(None, {"image": x}) for x in HELD_OUT]
    out = [q_sess.run(None, {"image": x}) for x in HELD_OUT]
    m = int8.int8_fidelity(ref, out)
    assert m["fp32_detections"] >= 5 and m["matched"] >= 0.7 * m["fp32_detections"], m
    assert m["mean_iou"] >= 0.995 and m["max_dscore"] <= 0.01 and m["kp_max_px"] <= 0.05, m
    f = int8.feature_fidelity(int8.ort_features(proto, 1), int8.ort_features(q, 1), HELD_OUT)
    assert f["min_cos"] >= 0.999 and f["min_snr_db"] >= 25.0, f


def _qdq_conv_model(with_bn: bool) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv(DQ int8 weight) [-> Mul -> Add] -> Relu -> Q/DQ -> y."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.integers(-100, 100, (8, 3, 3, 3)).astype(np.int8), "w_q"),
        numpy_helper.from_array(np.full(8, 0.01, np.float32), "w_s"),
        numpy_helper.from_array(np.zeros(8, np.int8), "w_z"),
        numpy_helper.from_array(np.float32(0.02), "x_s"),
        numpy_helper.from_array(np.uint8(128), "x_z"),
        numpy_helper.from_array(np.float32(0.05), "y_s"),
        numpy_helper.from_array(np.uint8(0), "y_z"),
        numpy_helper.from_array(rng.uniform(0.5, 2, (1, 8, 1, 1)).astype(np.float32), "bn_s"),
        numpy_helper.from_array(rng.normal(size=(1, 8, 1, 1)).astype(np.float32), "bn_t"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv", pads=[1, 1, 1, 1]),
    ]
    if with_bn:
        nodes += [
            helper.make_node("Mul", ["c", "bn_s"], ["m"]),
            helper.make_node("Add", ["m", "bn_t"], ["a"]),
            helper.make_node("Relu", ["a"], ["r"]),
        ]
    else:
        nodes.append(helper.make_node("Relu", ["c"], ["r"]))
    nodes += [
        helper.make_node("QuantizeLinear", ["r", "y_s", "y_z"], ["rq"]),
        helper.make_node("DequantizeLinear", ["rq", "y_s", "y_z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_onnx_runtime_runs_a_qdq_conv_in_int8_only_without_a_batchnorm_between() -> None:
    """Why the ONNX form folds the frozen batch norms: ONNX Runtime's optimized graph (read
    by ``ort_executed_ops``) has a QLinearConv for DQ -> Conv -> Relu -> Q, and none -- a
    float Conv on dequantized tensors -- when a Mul and an Add sit between Conv and Q."""
    plain = int8.ort_executed_ops(_qdq_conv_model(with_bn=False), threads=1)
    assert plain.get("QLinearConv") == 1, plain
    with_bn = int8.ort_executed_ops(_qdq_conv_model(with_bn=True), threads=1)
    assert "QLinearConv" not in with_bn and with_bn.get("DequantizeLinear", 0) >= 1, with_bn


def test_frozen_batchnorm_folds_into_the_convolution() -> None:
    """Conv -> Mul -> Add (per-channel constants) becomes one Conv writing the Add's tensor;
    ONNX Runtime gives the same output within 1e-5 (float32 rounding of W * scale)."""
    from onnx import TensorProto, helper, numpy_helper

    from damo_plugins.core.onnx_utils import ort_session

    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.uniform(0.5, 2, (1, 8, 1, 1)).astype(np.float32), "s"),
        numpy_helper.from_array(rng.normal(size=(1, 8, 1, 1)).astype(np.float32), "t"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Identity", ["s"], ["s_id"]),  # how the torch exporter shares them
        helper.make_node("Mul", ["c", "s_id"], ["m"]),
        helper.make_node("Add", ["m", "t"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folded, n = int8.fold_frozen_batchnorm(model)
    assert n == 1 and [x.op_type for x in folded.graph.node] == ["Conv", "Identity"]
    assert folded.graph.node[0].output[0] == "y"
    x = rng.normal(size=(1, 3, 16, 16)).astype(np.float32)
    ref = ort_session(model).run(None, {"x": x})[0]
    got = ort_session(folded).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_export_int8_refuses_a_non_ir_output(tmp_path) -> None:
    with pytest.raises(DamoError, match=r"must end in \.xml"):
        int8.export_int8(None, CALIB, tmp_path / "x.onnx")


# ----------------------------------------------------------------- bad input, CLI
def test_a_graph_without_detection_stages_is_refused() -> None:
    ops = ov.opset13
    image = ops.parameter([1, 3, 8, 8], np.float32, name="image")
    conv = ops.convolution(image, np.ones((4, 3, 3, 3), np.float32), [1, 1], [1, 1], [1, 1], [1, 1])
    model = ov.Model([ops.result(conv)], [image])
    with pytest.raises(DamoError, match="not a whole Keypoint R-CNN"):
        int8.quantize_keypoint_rcnn(model, CALIB[:1])
    with pytest.raises(DamoError, match=r"not one BGR image \[1, 3, H, W\]"):
        int8.quantize_keypoint_rcnn(model, [np.zeros((3, 8, 8), np.float32)])
    with pytest.raises(DamoError, match="calibration set is empty"):
        int8.quantize_keypoint_rcnn(model, [])
    with pytest.raises(DamoError, match="at least 2 images"):
        int8.split_holdout(CALIB[:1])
    # the ONNX form: same refusals, and a typo in the overflow fix is one line too
    conv_onnx = _qdq_conv_model(with_bn=False)
    with pytest.raises(DamoError, match="no RoiAlign"):
        int8.quantize_onnx_keypoint_rcnn(conv_onnx, CALIB[:1])
    with pytest.raises(DamoError, match="calibration set is empty"):
        int8.quantize_onnx_keypoint_rcnn(conv_onnx, [])
    with pytest.raises(DamoError, match="unknown overflow_fix 'all'"):
        int8.quantize_keypoint_rcnn(model, CALIB[:1], overflow_fix="all")  # type: ignore[arg-type]


def test_images_are_read_as_detectron2_does(tmp_path) -> None:
    from PIL import Image

    rgb = np.zeros((50, 100, 3), np.uint8)
    rgb[..., 0] = 200  # red
    Image.fromarray(rgb).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (img,) = int8.read_bgr_images(tmp_path, short_edge=80, max_size=133)
    assert img.shape == (1, 3, 66, 133)  # short side 80 would make the long side 160 > 133
    assert img[0, 2].mean() == pytest.approx(200) and img[0, 0].max() == 0  # BGR
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 20, 30), np.float32))
    assert [a.shape for a in int8.read_bgr_images(tmp_path / "x.npy")] == [(1, 3, 20, 30)] * 2
    with pytest.raises(DamoError, match="not found"):
        int8.read_bgr_images(tmp_path / "missing")
    (tmp_path / "b.jpg").write_bytes(b"garbage")
    with pytest.raises(DamoError, match="cannot decode image"):
        int8.read_bgr_images(tmp_path)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--int8", "--calib", "d", "-o", "m.xml"], "add --full"),
        (["--full", "--int8", "-o", "m.xml"], "needs calibration images"),
        (["--full", "--int8", "--calib", "d", "-o", "m.onnx"], r"must end in \.xml"),
        (["--full", "--calib", "d", "-o", "m.onnx"], "only used with --int8"),
    ],
)
def test_cli_int8_options_are_checked_first(argv, message, tmp_path) -> None:
    """Each mistake is one line, raised before anything is built or exported."""
    from damo_plugins.plugins import keypoints as plugin

    parser = argparse.ArgumentParser()
    plugin.damo_cli(parser.add_subparsers())
    args = parser.parse_args(["keypoints", "export", *argv])
    with pytest.raises(DamoError, match=message):
        args.func(args)


def test_cli_reads_the_calibration_images_before_exporting(tmp_path) -> None:
    """A missing folder or a single image fails in a second, not after the R50 export."""
    from PIL import Image

    from damo_plugins.plugins import keypoints as plugin

    parser = argparse.ArgumentParser()
    plugin.damo_cli(parser.add_subparsers())
    base = ["keypoints", "export", "--full", "--int8", "-o", str(tmp_path / "m.xml")]
    args = parser.parse_args([*base, "--calib", str(tmp_path / "missing")])
    with pytest.raises(DamoError, match="not found"):
        args.func(args)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "one.png")
    args = parser.parse_args([*base, "--calib", str(tmp_path)])
    with pytest.raises(DamoError, match="at least 2 images"):
        args.func(args)
