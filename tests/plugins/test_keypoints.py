"""Keypoint post-processing, ROIAlign and head: PyTorch, ONNX Runtime and OpenVINO parity.

The reference below is written independently and deliberately naively: one
``F.interpolate`` per ROI, exactly as Detectron2 describes the semantics.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from damo_plugins.core.errors import DamoError
from damo_plugins.keypoints.export import (
    compare_keypoints,
    export_keypoint_model,
    export_postprocess,
    openvino_runner,
    ort_runner,
    verify_keypoint_model,
)
from damo_plugins.keypoints.head import KeypointRCNNHead
from damo_plugins.keypoints.postprocess import (
    heatmaps_to_keypoints,
    heatmaps_to_keypoints_loop,
    heatmaps_to_keypoints_vectorized,
)
from damo_plugins.keypoints.roi_align import ROIAlign

K = 5  # keypoints: fewer than COCO's 17 keeps the suite fast; nothing depends on K


def reference(maps: torch.Tensor, rois: torch.Tensor) -> np.ndarray:
    out = np.zeros((maps.shape[0], maps.shape[1], 4), np.float64)
    for i in range(maps.shape[0]):
        x0, y0, x1, y1 = rois[i].tolist()
        w, h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
        wc, hc = int(np.ceil(w)), int(np.ceil(h))
        big = F.interpolate(maps[i : i + 1], size=(hc, wc), mode="bicubic", align_corners=False)[0]
        for k in range(maps.shape[1]):
            flat = big[k].reshape(-1)
            pos = int(torch.argmax(flat))  # first maximum
            m = float(flat[pos])
            yi, xi = divmod(pos, wc)
            score = 1.0 / float(torch.exp(maps[i, k].double() - m).sum())
            out[i, k] = [(xi + 0.5) * w / wc + x0, (yi + 0.5) * h / hc + y0, m, score]
    return out


def boxes(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    hgt = torch.rand(n, generator=g) * (hi - lo) + lo
    wid = hgt * (torch.rand(n, generator=g) * 0.6 + 0.3)
    x0 = torch.rand(n, generator=g) * 300 + 0.37
    y0 = torch.rand(n, generator=g) * 300 + 0.61
    return torch.stack([x0, y0, x0 + wid, y0 + hgt], 1)


def blobs(n: int, g: torch.Generator, size: int = 56) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size * 1.0), torch.arange(size * 1.0), indexing="ij")
    c = torch.rand(n, K, 2, generator=g) * (size - 6) + 3
    d2 = (yy - c[..., 0, None, None]) ** 2 + (xx - c[..., 1, None, None]) ** 2
    return 6 * torch.exp(-d2 / 6) + 0.2 * torch.randn(n, K, size, size, generator=g)


def cases() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    tiny = torch.tensor([[5.0, 5.0, 5.4, 5.9], [3.0, 4.0, 2.0, 1.0], [7.2, 1.1, 8.05, 2.3]])
    frac = torch.tensor([[0.3, 0.7, 61.45, 130.2], [10.5, 20.25, 40.75, 33.125]])
    return {
        "R0": (torch.zeros(0, K, 56, 56), torch.zeros(0, 4)),
        "R1": (torch.randn(1, K, 56, 56, generator=g), boxes(1, 80, 200, g)),
        "random": (torch.randn(6, K, 56, 56, generator=g), boxes(6, 40, 160, g)),
        "blobs": (blobs(6, g), boxes(6, 60, 300, g)),
        "tiny": (torch.randn(3, K, 56, 56, generator=g), tiny),
        "huge": (blobs(2, g), torch.tensor([[0.0, 0.0, 520.5, 610.0], [3.0, 9.0, 400.0, 540.25]])),
        "fractional": (torch.randn(2, K, 56, 56, generator=g), frac),
        "R100": (blobs(100, g), boxes(100, 8, 60, g)),
    }


def assert_close(ref: np.ndarray, out: np.ndarray) -> None:
    m = compare_keypoints(ref, out)
    assert out.shape == ref.shape
    assert m["argmax_agreement"] == 1.0, m
    assert m["max_dx_px"] < 1e-3 and m["max_dy_px"] < 1e-3, m
    if ref.size:
        assert m["max_dlogit"] < 2e-4 and m["max_rel_dscore"] < 1e-4, m


@pytest.fixture(scope="module")
def data() -> dict[str, tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
    return {name: (m, r, reference(m, r)) for name, (m, r) in cases().items()}


@pytest.mark.parametrize(
    "fn", [heatmaps_to_keypoints, heatmaps_to_keypoints_loop, heatmaps_to_keypoints_vectorized]
)
def test_torch_matches_reference(fn, data) -> None:
    for name, (maps, rois, ref) in data.items():
        out = fn(maps, rois).numpy()
        assert out.shape == (maps.shape[0], K, 4), name
        assert_close(ref, out)


@pytest.fixture(scope="module")
def graphs() -> dict[tuple[str, int], onnx.ModelProto]:
    out = {("pruned", o): export_postprocess(o, "pruned", K) for o in (16, 17, 18)}
    out[("loop", 17)] = export_postprocess(17, "loop", K)
    out[("vectorized", 16)] = export_postprocess(16, "vectorized", K)
    out[("vectorized", 18)] = export_postprocess(18, "vectorized", K)
    return out


def test_postprocess_graph_interface(graphs) -> None:
    proto = graphs[("pruned", 17)]
    ins = {i.name: i for i in proto.graph.input}
    assert list(ins) == ["maps", "rois"]
    assert [o.name for o in proto.graph.output] == ["keypoints"]
    assert ins["rois"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert not [n for n in proto.graph.node if n.op_type in ("Loop", "Scan", "Resize")]
    assert [n for n in graphs[("loop", 17)].graph.node if n.op_type == "Loop"]
    ops = {n.op_type for n in graphs[("vectorized", 18)].graph.node}
    assert not ops & {"Resize", "MatMul", "Gemm", "Conv", "ConvTranspose"}, ops


@pytest.mark.parametrize(
    "key",
    [
        ("pruned", 16),
        ("pruned", 17),
        ("pruned", 18),
        ("loop", 17),
        ("vectorized", 16),
        ("vectorized", 18),
    ],
)
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_exported_postprocess(graphs, data, key, backend) -> None:
    run = (ort_runner if backend == "onnxruntime" else openvino_runner)(graphs[key])
    for name, (maps, rois, ref) in data.items():
        if key[0] == "loop" and name == "R100":
            continue
        out = run([maps.numpy(), rois.numpy()])
        assert out.shape == ref.shape, name
        assert_close(ref, out)


@pytest.mark.parametrize(
    ("maps", "rois", "words"),
    [
        (torch.zeros(2, K, 56), torch.zeros(2, 4), "4 dimensions"),
        (torch.zeros(2, K, 56, 56), torch.zeros(2, 5), "[R, 4]"),
        (torch.zeros(2, K, 56, 56), torch.zeros(3, 4), "2 ROIs but rois has 3"),
        (torch.full((1, K, 56, 56), float("nan")), torch.ones(1, 4), "NaN"),
        (torch.zeros(1, K, 56, 56), torch.tensor([[0.0, 0.0, float("inf"), 1.0]]), "NaN"),
    ],
)
def test_bad_input_is_a_clear_error(maps, rois, words) -> None:
    for fn in (heatmaps_to_keypoints, heatmaps_to_keypoints_loop, heatmaps_to_keypoints_vectorized):
        with pytest.raises(DamoError, match=words.replace("[", r"\[").replace("]", r"\]")):
            fn(maps, rois)


def test_roi_align_matches_onnx_roialign() -> None:
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 4, 30, 40, generator=g)
    rois = torch.tensor(
        [
            [0, 10, 20, 200, 150],
            [1, -5, -3, 30.5, 40.2],
            [0, 50, 50, 50.3, 50.4],
            [1, 90, 60, 170, 130],
        ]
    )
    pooler = ROIAlign((7, 7), 1 / 4, 0)
    ref = pooler(feats, rois).numpy()
    proto = export_keypoint_model(_Wrap(pooler, feats, rois), opset=16)
    assert [n.op_type for n in proto.graph.node if n.op_type == "RoiAlign"] == ["RoiAlign"]
    attrs = {a.name: a for n in proto.graph.node if n.op_type == "RoiAlign" for a in n.attribute}
    assert attrs["coordinate_transformation_mode"].s == b"half_pixel"
    for runner in (ort_runner, openvino_runner):
        run = runner(proto)
        np.testing.assert_allclose(run([feats.numpy(), rois.numpy()]), ref, atol=5e-5)
        assert run([feats.numpy(), rois.numpy()[:0]]).shape == (0, 4, 7, 7)


def test_roi_align_refuses_old_opset() -> None:
    feats, rois = torch.randn(1, 2, 8, 8), torch.tensor([[0.0, 1, 1, 5, 5]])
    with pytest.raises(DamoError, match="opset"):
        import io

        torch.onnx.export(
            ROIAlign((2, 2), 1.0), (feats, rois), io.BytesIO(), dynamo=False, opset_version=11
        )


class _Wrap(torch.nn.Module):
    input_names = ("features", "rois")
    output_names = ("pooled",)

    def __init__(self, pooler, feats, rois):
        super().__init__()
        self.pooler, self.feats, self.rois = pooler, feats, rois

    def forward(self, feats, rois):
        return self.pooler(feats, rois)

    def example_inputs(self, num_rois, seed=0):
        return self.feats, self.rois

    def dynamic_axes(self):
        return {"rois": {0: "R"}, "pooled": {0: "R"}}


@pytest.fixture(scope="module")
def head() -> KeypointRCNNHead:
    torch.manual_seed(0)
    return KeypointRCNNHead(in_channels=8, num_keypoints=K, conv_dims=(16, 16), image_size=128)


def test_head_end_to_end(head) -> None:
    out = head(*head.example_inputs(3))
    assert out.shape == (3, K, 3)
    proto = export_keypoint_model(head, opset=17)
    assert [n for n in proto.graph.node if n.op_type == "RoiAlign"]
    results = verify_keypoint_model(head, proto, (0, 1, 6))
    for backend, per_r in results.items():
        for r, m in per_r.items():
            assert m["argmax_agreement"] == 1.0, (backend, r, m)
            assert m["max_dx_px"] < 1e-3 and m["max_rel_dscore"] < 1e-4, (backend, r, m)


def test_pass_and_cli(head, tmp_path) -> None:
    from damo_plugins.core.artifact import ModelArtifact
    from damo_plugins.core.manager import get_manager
    from damo_plugins.core.passes import PassContext
    from damo_plugins.plugins import keypoints as plugin

    mgr = get_manager()
    assert mgr.get_pass("keypoints") is plugin.KeypointsPass
    assert mgr.get_model_builder("keypoint-rcnn-head") is not None
    art = ModelArtifact("torch", head)
    step = plugin.KeypointsPass({"opset": 18, "verify_rois": [0, 2]})
    ctx = PassContext(manager=mgr, workdir=tmp_path)
    after = step.run(art, ctx)
    assert after.format == "onnx" and art.model is head
    v = step.verify(art, after, ctx)
    assert v.passed, v.message
    assert set(ctx.extra["keypoints"]) == {"onnxruntime", "openvino"}
    with pytest.raises(DamoError, match="protocol"):
        step.run(ModelArtifact("torch", torch.nn.Conv2d(1, 1, 1)), ctx)

    parser = argparse.ArgumentParser()
    plugin.damo_cli(parser.add_subparsers())
    target = tmp_path / "pp.onnx"
    args = parser.parse_args(
        [
            "keypoints",
            "export",
            "--postprocess-only",
            "--opset",
            "16",
            "-o",
            str(target),
            "--num-keypoints",
            str(K),
            "--no-verify",
        ]
    )
    assert args.func(args) == 0
    saved = onnx.load(str(target))
    assert [i.name for i in saved.graph.input] == ["maps", "rois"]
    dims = [d.dim_param or d.dim_value for d in saved.graph.output[0].type.tensor_type.shape.dim]
    assert dims[0] == "R" and dims[1:] == [K, 4]
    bad = parser.parse_args(["keypoints", "export", "--postprocess-only", "-o", "x.txt"])
    with pytest.raises(DamoError, match=r"\.onnx"):
        bad.func(bad)
    bad = parser.parse_args(
        ["keypoints", "export", "--postprocess-only", "--opset", "11", "-o", str(target)]
    )
    with pytest.raises(DamoError, match="opsets"):
        bad.func(bad)
