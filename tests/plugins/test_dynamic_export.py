"""DAMO-YOLO exported with dynamic batch, height and width (``export --dynamic``).

The anchor grid follows the runtime feature-map size in a dynamic export (shape ops in the
graph) and stays constant in a static one; the decode tail is still found (and kept in float
by INT8 quantization) in both. Every comparison is against PyTorch eager on the same input.

Tolerances (FP32): ``scores`` (sigmoid, in [0, 1]) within 1e-5 absolute; ``boxes`` (input
pixels, up to ~320 here) within 1e-4 x the largest |coordinate| — measured errors are ~1e-7
and ~6e-5 px (float sums in another order). INT8 (NNCF, decode in float): cosine similarity
>= 0.999 per output and boxes within 1 px (measured: cosine > 0.99999, ~0.15 px).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from damo_plugins.core.artifact import ModelArtifact, load_model, onnx_artifact
from damo_plugins.data.synthetic import generate
from damo_plugins.lib.decode import name_onnx_nodes, onnx_decode_nodes
from damo_plugins.lib.onnx_export import export_onnx, tracing_dynamic_size
from damo_plugins.lib.reparam import reparameterize
from damo_plugins.models.damo_yolo import build_damo_yolo_t
from tests.conftest import damo_opt, randomize_bn

#: (batch, height, width) checked on one dynamic export
SIZES = [(b, h, w) for h, w in ((224, 224), (256, 320), (320, 320)) for b in (1, 2)]


def _detector(size: int = 224) -> ModelArtifact:
    torch.manual_seed(0)
    model = randomize_bn(build_damo_yolo_t(num_classes=3, width=0.25))
    # a non-zero class bias spread, so scores are not all the prior (0.01) everywhere
    with torch.no_grad():
        for conv in model.head.gfl_cls:
            conv.bias.normal_(0.0, 1.0)
    return load_model(model, input_shape=[1, 3, size, size])


def _assert_close(got: list[np.ndarray], ref: list[np.ndarray], where: str) -> None:
    scores, boxes = got
    assert scores.shape == ref[0].shape and boxes.shape == ref[1].shape, where
    assert float(np.abs(scores - ref[0]).max()) <= 1e-5, where
    scale = max(1.0, float(np.abs(ref[1]).max()))
    assert float(np.abs(boxes - ref[1]).max()) <= 1e-4 * scale, where


def _eager(model: torch.nn.Module, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        return [t.numpy() for t in model(torch.from_numpy(x))]


@pytest.mark.slow
def test_dynamic_export_matches_eager_in_onnxruntime_and_openvino(tmp_path: Path) -> None:
    import openvino as ov

    det = _detector()
    o = onnx_artifact(export_onnx(det, dynamic_batch=True, dynamic_size=True))
    # inputs: batch/height/width dynamic; outputs: only the anchor axis besides the batch
    assert o.inputs[0].shape == ["batch", 3, "height", "width"]
    shapes = {t.name: t.shape for t in o.outputs}
    assert shapes["scores"][0] == "batch" and shapes["scores"][2] == 3
    assert shapes["boxes"][0] == "batch" and shapes["boxes"][2] == 4
    assert isinstance(shapes["scores"][1], str) and isinstance(shapes["boxes"][1], str)

    onnx.save(o.model, str(tmp_path / "det.onnx"))
    model_ov = ov.convert_model(str(tmp_path / "det.onnx"))
    assert model_ov.inputs[0].get_partial_shape().is_dynamic
    compiled = ov.Core().compile_model(model_ov, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    rng = np.random.default_rng(0)
    for b, h, w in SIZES:
        x = rng.random((b, 3, h, w), dtype=np.float32)
        ref = _eager(det.model, x)
        assert ref[0].shape == (b, 21 * (h // 32) * (w // 32), 3)  # 8/16/32 strides: 16+4+1
        _assert_close(o.run([x]), ref, f"onnxruntime {b}x{h}x{w}")
        _assert_close(list(compiled(x).values()), ref, f"openvino {b}x{h}x{w}")

    # OpenVINO can fix the shape again (reshape) and compile the static model
    model_ov.reshape([1, 3, 256, 320])
    assert [list(p.get_shape()) for p in model_ov.outputs] == [[1, 1680, 3], [1, 1680, 4]]
    static = ov.Core().compile_model(model_ov, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x = rng.random((1, 3, 256, 320), dtype=np.float32)
    _assert_close(list(static(x).values()), _eager(det.model, x), "openvino reshaped")


def test_static_export_keeps_constant_anchors_and_both_decode_tails_are_found() -> None:
    det = _detector(size=128)
    static = name_onnx_nodes(export_onnx(det))
    dynamic = name_onnx_nodes(export_onnx(det, dynamic_batch=True, dynamic_size=True))
    ops = {
        "static": {n.name: n.op_type for n in static.graph.node},
        "dynamic": {n.name: n.op_type for n in dynamic.graph.node},
    }
    # constant anchors: no Range (the grid is an initializer); dynamic: built from Shape
    assert "Range" not in ops["static"].values()
    assert "Range" in ops["dynamic"].values()
    for kind, proto in (("static", static), ("dynamic", dynamic)):
        tail = {ops[kind][n] for n in onnx_decode_nodes(proto)}
        assert {"Sigmoid", "Softmax", "MatMul", "Sub", "Add", "Concat"} <= tail, kind
        assert not tail & {"Conv", "Resize", "MaxPool", "Relu"}, kind
    tail_dyn = {ops["dynamic"][n] for n in onnx_decode_nodes(dynamic)}
    assert {"Range", "Shape"} <= tail_dyn  # the anchor grid belongs to the float tail
    # the switch is scoped to the export: eager calls afterwards take the static path
    assert tracing_dynamic_size() is False


def test_graph_mode_reparameterized_model_exports_dynamic() -> None:
    """After graph-level fusion the model is an fx ``GraphModule``; the anchor grid is one
    opaque call in it, so it still follows the runtime size when exported dynamically."""
    det = _detector(size=128)
    fused, _ = reparameterize(det.model, "graph")
    assert isinstance(fused, torch.fx.GraphModule)
    art = det.derive(model=fused)
    o = onnx_artifact(export_onnx(art, dynamic_batch=True, dynamic_size=True))
    x = np.random.default_rng(2).random((2, 3, 192, 160), dtype=np.float32)
    _assert_close(o.run([x]), _eager(det.model, x), "graph-fused 2x192x160")


@pytest.mark.slow
def test_dynamic_export_step_through_the_pipeline_then_int8(tmp_path: Path) -> None:
    """``export: {dynamic: true}`` then NNCF INT8 on ONNX: later steps verify and calibrate at
    the model's own size (not 1x1), and the decode stays in float."""
    from damo_plugins.core.pipeline import run

    det = _detector(size=96)
    data = generate(tmp_path / "data", train=12, val=2, seed=4)
    recipe = {
        "model": "damo-yolo-t",
        "steps": [
            {"export": {"dynamic": True}},
            {
                "quantize": {
                    "adapter": "nncf",
                    "target": "onnx",
                    "calibration": str(Path(data) / "train"),
                    "fuse": False,
                }
            },
        ],
    }
    result = run(recipe, output=tmp_path / "run", model=det, force=True, log=lambda *_: None)
    assert result.report["status"] == "ok"
    final = Path(result.report["steps"][-1]["artifact"])
    q = onnx.load(str(final))
    dims = [d.dim_param or d.dim_value for d in q.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    _assert_int8_decode_float_onnx(q)
    qa = onnx_artifact(q)
    for b, h, w in ((1, 96, 96), (2, 128, 160)):
        x = np.random.default_rng(h).random((b, 3, h, w), dtype=np.float32)
        _assert_int8_close(qa.run([x]), _eager(det.model, x), f"int8 onnx {b}x{h}x{w}")


def _assert_int8_decode_float_onnx(proto: onnx.ModelProto) -> None:
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") > 10  # really INT8
    producer = {o: n for n in proto.graph.node for o in n.output}
    for node in proto.graph.node:
        if node.op_type in ("Sigmoid", "Softmax", "Range"):
            src = producer.get(node.input[0])
            assert src is None or src.op_type != "DequantizeLinear", node.name


def _assert_int8_close(got: list[np.ndarray], ref: list[np.ndarray], where: str) -> None:
    for g, r in zip(got, ref):
        assert g.shape == r.shape, where
        cos = float(g.ravel() @ r.ravel() / (np.linalg.norm(g) * np.linalg.norm(r)))
        assert cos >= 0.999, f"{where}: cosine {cos}"
    assert float(np.abs(got[1] - ref[1]).max()) <= 1.0, where


@pytest.mark.slow
def test_export_int8_dynamic_openvino_in_one_command(tmp_path: Path) -> None:
    import openvino as ov

    from damo_plugins.lib.openvino_graph import decode_nodes

    det = _detector(size=96)
    ckpt = tmp_path / "official.pth"
    torch.save({"epoch": 3, "model": det.model.state_dict(), "optimizer": {}}, ckpt)
    data = generate(tmp_path / "data", train=12, val=2, seed=5)
    out = tmp_path / "int8" / "det.xml"
    proc = damo_opt(
        "export", ckpt, "--format", "openvino", "--int8", "--data", data, "--dynamic",
        "--imgsz", "96", "-o", out, "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["dynamic"] is True
    assert [s["step"] for s in summary["steps"]] == ["reparam", "export", "convert", "quantize"]
    model = ov.Core().read_model(str(out))
    assert model.inputs[0].get_partial_shape().is_dynamic
    types = {op.get_friendly_name(): op.get_type_name() for op in model.get_ordered_ops()}
    assert sum(t == "FakeQuantize" for t in types.values()) > 10
    tail = {types[n] for n in decode_nodes(model)}
    assert {"Sigmoid", "Softmax", "Range"} <= tail and "FakeQuantize" not in tail
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for b, h, w in ((1, 96, 96), (2, 128, 160)):
        x = np.random.default_rng(w).random((b, 3, h, w), dtype=np.float32)
        got = list(compiled(x).values())
        _assert_int8_close(got, _eager(det.model, x), f"int8 openvino {b}x{h}x{w}")
