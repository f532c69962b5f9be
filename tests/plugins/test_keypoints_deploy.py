"""Keypoints from a Detectron2 checkpoint to a deployable graph: weights, image sizes,
OpenVINO precision, empty boxes and the certified vectorized post-processing."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from damo_plugins.core.errors import DamoError
from damo_plugins.keypoints import postprocess as pp
from damo_plugins.keypoints.export import (
    export_keypoint_model,
    export_postprocess,
    openvino_runner,
    ort_runner,
    verify_keypoint_model,
)
from damo_plugins.keypoints.head import KeypointRCNNHead, upsample2x_bilinear
from damo_plugins.keypoints.roi_align import ROIAlign
from damo_plugins.keypoints.weights import loads_numpy_pickle, read_checkpoint

K = 5
CONV = (16, 16)


def small_head(**kw) -> KeypointRCNNHead:
    torch.manual_seed(0)
    return KeypointRCNNHead(in_channels=8, num_keypoints=K, conv_dims=CONV, image_size=128, **kw)


def detectron2_state(
    seed: int = 1, c_in: int = 8, conv: tuple[int, ...] = CONV
) -> dict[str, np.ndarray]:
    """Random weights under Detectron2's names, plus some backbone/RPN entries to skip."""
    g = np.random.default_rng(seed)
    state = {}
    # He-scaled like a trained head, so logits stay in a realistic range
    for i, dim in enumerate(conv, 1):
        std = np.sqrt(2.0 / (c_in * 9))
        state[f"roi_heads.keypoint_head.conv_fcn{i}.weight"] = g.normal(0, std, (dim, c_in, 3, 3))
        state[f"roi_heads.keypoint_head.conv_fcn{i}.bias"] = g.normal(0, 0.1, (dim,))
        c_in = dim
    std = np.sqrt(2.0 / (c_in * 4))
    state["roi_heads.keypoint_head.score_lowres.weight"] = g.normal(0, std, (c_in, K, 4, 4))
    state["roi_heads.keypoint_head.score_lowres.bias"] = g.normal(0, 0.1, (K,))
    state["backbone.bottom_up.res2.0.conv1.weight"] = g.normal(size=(64, 64, 1, 1))
    state["proposal_generator.rpn_head.conv.weight"] = g.normal(size=(256, 256, 3, 3))
    return {k: v.astype(np.float32) for k, v in state.items()}


# ------------------------------------------------------------------------- weights
@pytest.mark.parametrize("protocol", [2, 4])
def test_pkl_checkpoint_loads_into_head(tmp_path, protocol) -> None:
    state = detectron2_state()
    path = tmp_path / "model_final.pkl"
    payload = {"model": state, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    head = small_head()
    unused = head.load_detectron2(path)
    assert unused == []  # backbone/RPN entries are outside the head's prefix
    got = head.state_dict()
    for name in ("conv_fcn1.weight", "conv_fcn2.bias", "score_lowres.weight"):
        want = state[f"roi_heads.keypoint_head.{name}"]
        np.testing.assert_array_equal(got[name].numpy(), want)
    # the loaded head computes with the loaded weights: conv_fcn1 of a constant input
    x = torch.ones(1, 8, 3, 3)
    ref = F.conv2d(
        x,
        torch.from_numpy(state["roi_heads.keypoint_head.conv_fcn1.weight"]),
        torch.from_numpy(state["roi_heads.keypoint_head.conv_fcn1.bias"]),
        padding=1,
    )
    torch.testing.assert_close(head.conv_fcn1(x), ref)


def test_pth_checkpoint_loads_with_weights_only(tmp_path) -> None:
    state = detectron2_state(2)
    path = tmp_path / "model_final.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}, "iteration": 9}, path)
    head = small_head()
    head.load_detectron2(path)
    np.testing.assert_array_equal(
        head.score_lowres.bias.detach().numpy(),
        state["roi_heads.keypoint_head.score_lowres.bias"],
    )


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/_kp_pickle_ran",))


def test_malicious_pickles_are_refused_without_running(tmp_path) -> None:
    marker = Path("/tmp/_kp_pickle_ran")
    marker.unlink(missing_ok=True)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"model": {"x": _Payload()}}, protocol=2))
    with pytest.raises(DamoError, match=r"would run code: (posix|os)\.system"):
        read_checkpoint(evil)
    assert not marker.exists()
    # a global hidden behind numpy's name space is refused too
    with pytest.raises(DamoError, match=r"would run code: numpy\.load"):
        loads_numpy_pickle(b"\x80\x02cnumpy\nload\nq\x00.")
    # _codecs.encode is admitted only with latin-1 (what protocol 2 uses for bytes)
    with pytest.raises(DamoError, match="would run code"):
        loads_numpy_pickle(
            b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x06\x00\x00\x00base64\x86R."
        )
    # .pth goes through torch.load(weights_only=True), which refuses the same payload
    bad_pth = tmp_path / "evil.pth"
    torch.save({"model": {"x": _Payload()}}, bad_pth)
    with pytest.raises(DamoError, match=r"refused to load evil\.pth"):
        read_checkpoint(bad_pth)
    assert not marker.exists()


def test_checkpoint_problems_are_one_line(tmp_path) -> None:
    state = detectron2_state()
    del state["roi_heads.keypoint_head.conv_fcn2.bias"]
    path = tmp_path / "partial.pkl"
    path.write_bytes(pickle.dumps({"model": state}))
    with pytest.raises(
        DamoError, match=r"lacks 1 parameter\(s\): roi_heads.keypoint_head.conv_fcn2.bias"
    ):
        small_head().load_detectron2(path)
    state = detectron2_state()
    state["roi_heads.keypoint_head.score_lowres.bias"] = np.zeros(17, np.float32)
    path.write_bytes(pickle.dumps({"model": state}))
    with pytest.raises(DamoError, match=r"shapes differ: .*score_lowres.bias \[17\] vs \[5\]"):
        small_head().load_detectron2(path)
    (tmp_path / "x.yaml").write_text("a: 1")
    with pytest.raises(DamoError, match="unknown checkpoint type"):
        read_checkpoint(tmp_path / "x.yaml")
    with pytest.raises(DamoError, match="not found"):
        read_checkpoint(tmp_path / "missing.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(DamoError, match="not a readable pickle"):
        read_checkpoint(tmp_path / "junk.pkl")


# ------------------------------------------------------------------ head: sizes, NaN
def test_upsample_matches_bilinear() -> None:
    x = torch.randn(3, 4, 28, 19)
    ref = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsample2x_bilinear(x), ref, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def loaded_head_graph() -> tuple[KeypointRCNNHead, onnx.ModelProto]:
    head = small_head()
    head.load_detectron2(detectron2_state())
    return head, export_keypoint_model(head, opset=17)


def test_head_any_image_size(loaded_head_graph) -> None:
    head, proto = loaded_head_graph
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in proto.graph.input
    }
    assert dims["p2"] == [1, 8, "p2_h", "p2_w"] and dims["boxes"] == ["R", 4]
    results = verify_keypoint_model(head, proto, (0, 3), image_sizes=(96, 200, 320))
    for backend, per_r in results.items():
        assert {"R=3@96", "R=3@200", "R=3@320"} <= set(per_r), per_r
        for r, m in per_r.items():
            assert m["argmax_agreement"] == 1.0, (backend, r, m)
            assert m["max_dx_px"] < 1e-3 and m["max_rel_dscore"] < 1e-4, (backend, r, m)


def test_roi_align_empty_boxes_give_zeros_everywhere() -> None:
    feats = torch.randn(1, 4, 30, 40, generator=torch.Generator().manual_seed(3))
    rois = torch.tensor(
        [[0, 10, 20, 10, 150], [0, 5, 5, 3, 3], [0, 7, 7, 7, 7.0], [0, 1, 2, 30, 40]]
    )
    pooler = ROIAlign((7, 7), 1 / 4, 0)
    ref = pooler(feats, rois).numpy()
    assert not ref[:3].any() and ref[3].any()  # torchvision semantics: empty -> zeros

    class Wrap(torch.nn.Module):
        input_names, output_names = ("features", "rois"), ("pooled",)

        def forward(self, f, r):
            return pooler(f, r)

        def example_inputs(self, num_rois, seed=0):
            return feats, rois

        def dynamic_axes(self):
            return {"rois": {0: "R"}, "pooled": {0: "R"}}

    proto = export_keypoint_model(Wrap(), opset=16)
    assert [n.op_type for n in proto.graph.node if n.op_type in ("RoiAlign", "Where")] == [
        "RoiAlign",
        "Where",
    ]
    for runner in (ort_runner, openvino_runner):
        out = runner(proto)([feats.numpy(), rois.numpy()])
        assert np.isfinite(out).all(), runner.__name__
        np.testing.assert_allclose(out, ref, atol=5e-5)


def test_head_empty_boxes_finite_in_openvino(loaded_head_graph) -> None:
    head, proto = loaded_head_graph
    feats = head.example_inputs(0)[:4]
    boxes = torch.tensor([[30.0, 40.0, 30.0, 90.0], [50.0, 50.0, 20.0, 10.0], [5, 6, 60, 110]])
    with torch.no_grad():
        ref = head(*feats, boxes).numpy()
    feeds = [f.numpy() for f in feats] + [boxes.numpy()]
    for runner in (ort_runner, openvino_runner):
        out = runner(proto)(feeds)
        assert np.isfinite(out).all(), runner.__name__
        np.testing.assert_allclose(out[..., :2], ref[..., :2], atol=1e-3)


# ------------------------------------------------------- vectorized: fallback, bf16 tail
def test_vectorized_fallback_is_exact(monkeypatch) -> None:
    """Noise maps defeat the certificate: those ROIs go through the exact fallback."""
    g = torch.Generator().manual_seed(5)
    maps = torch.randn(4, K, 56, 56, generator=g)
    rois = torch.tensor([[3.0, 4, 90, 260], [10, 10, 40, 30], [0, 0, 1, 1], [7, 9, 300, 200]])
    seen = []
    refine = pp._refine
    monkeypatch.setattr(
        pp, "_refine", lambda m, r, o, t: seen.append(t.numel()) or refine(m, r, o, t)
    )
    out = pp.heatmaps_to_keypoints_vectorized(maps, rois).numpy()
    assert seen and seen[0] >= 2  # at least two ROIs were not certified on the fast path
    ref = pp.heatmaps_to_keypoints_loop(maps, rois).numpy()
    np.testing.assert_allclose(out[..., :2], ref[..., :2], atol=1e-3)
    np.testing.assert_allclose(out[..., 2:], ref[..., 2:], rtol=1e-4, atol=1e-4)
    monkeypatch.undo()
    proto = export_postprocess(17, "vectorized", K)
    for runner in (ort_runner, openvino_runner):
        got = runner(proto)([maps.numpy(), rois.numpy()])
        np.testing.assert_allclose(got[..., :2], ref[..., :2], atol=1e-3)


#: CPU-plugin node types after which (towards the outputs) bf16 enforcement stops; a graph
#: with none of them is all "tail" and runs in f32 under the bf16 default
BF16_SIGNIFICANT = {
    "Convolution",
    "MatMul",
    "FullyConnected",
    "Interpolate",
    "ROIPooling",
    "GroupConvolution",
    "RNNCell",
    "RNNSequence",
}


def test_vectorized_graph_stays_f32_under_openvino_defaults() -> None:
    import openvino as ov

    core = ov.Core()
    vec = core.read_model(export_postprocess(17, "vectorized", K).SerializeToString(), b"")
    types = {op.get_type_name() for op in vec.get_ordered_ops()}
    for op in vec.get_ordered_ops():  # Loop bodies too
        if op.get_type_name() == "Loop":
            types |= {o.get_type_name() for o in op.get_function().get_ordered_ops()}
    assert not types & BF16_SIGNIFICANT, types & BF16_SIGNIFICANT
    # the Loop form is not: its body's MatMuls (and what feeds them) go bf16
    loop = core.read_model(export_postprocess(17, "loop", K).SerializeToString(), b"")
    body = [op.get_function() for op in loop.get_ordered_ops() if op.get_type_name() == "Loop"]
    assert any(o.get_type_name() == "MatMul" for o in body[0].get_ordered_ops())
    # and compiled with no config at all it is exact (on this machine the default is f32
    # unless the CPU has AVX-512 BF16; the assertion holds either way by the tail rule)
    g = torch.Generator().manual_seed(7)
    maps, rois = (
        torch.randn(6, K, 56, 56, generator=g),
        torch.tensor([[1.0, 2, 80, 200], [300, 100, 420, 500], [5, 5, 6, 6]] * 2),
    )
    ref = pp.heatmaps_to_keypoints_loop(maps, rois).numpy()
    # plain compile_model, and benchmark_app's default (throughput hint, several requests)
    for config in ({}, {"PERFORMANCE_HINT": "THROUGHPUT"}):
        compiled = core.compile_model(vec, "CPU", config)
        out = compiled({"maps": maps.numpy(), "rois": rois.numpy()})[0]
        np.testing.assert_allclose(out[..., :2], ref[..., :2], atol=1e-3, err_msg=str(config))


@pytest.mark.slow
def test_cli_export_with_weights(tmp_path, capsys) -> None:
    """A full-size (8 x 512 convolutions) random Detectron2 head: ~10 s, hence slow."""
    from damo_plugins.plugins import keypoints as plugin

    ckpt = tmp_path / "kp.pkl"
    ckpt.write_bytes(pickle.dumps({"model": detectron2_state()}))
    parser = argparse.ArgumentParser()
    plugin.damo_cli(parser.add_subparsers())
    args = parser.parse_args(
        [
            "keypoints",
            "export",
            "-o",
            str(tmp_path / "h.onnx"),
            "--weights",
            str(ckpt),
            "--num-keypoints",
            str(K),
            "--no-verify",
        ]
    )
    # the registered builder has Detectron2's 8 convolutions; the small checkpoint has 2
    with pytest.raises(DamoError, match=r"lacks 12 parameter\(s\): roi_heads"):
        args.func(args)
    # a full-size (random) Detectron2 keypoint head loads and exports
    full = detectron2_state(3, c_in=256, conv=(512,) * 8)
    ckpt.write_bytes(pickle.dumps({"model": full}, protocol=4))
    capsys.readouterr()
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "loaded" in out and "INFERENCE_PRECISION_HINT" in out
    saved = onnx.load(str(tmp_path / "h.onnx"))
    w = {t.name: t for t in saved.graph.initializer}
    want = full["roi_heads.keypoint_head.score_lowres.weight"]
    assert any(
        tuple(t.dims) == want.shape and np.array_equal(onnx.numpy_helper.to_array(t), want)
        for t in w.values()
    )


# ----------------------------------------------------------- ResNet-50 + FPN backbone
#: names and shapes as they appear in Detectron2's keypoint_rcnn_R_50_FPN_3x checkpoint
D2_BACKBONE = {
    "backbone.bottom_up.stem.conv1.weight": (64, 3, 7, 7),
    "backbone.bottom_up.stem.conv1.norm.running_var": (64,),
    "backbone.bottom_up.res2.0.shortcut.weight": (256, 64, 1, 1),
    "backbone.bottom_up.res2.0.conv1.norm.weight": (64,),
    "backbone.bottom_up.res3.0.conv1.weight": (128, 256, 1, 1),
    "backbone.bottom_up.res4.5.conv3.weight": (1024, 256, 1, 1),
    "backbone.bottom_up.res5.2.conv2.weight": (512, 512, 3, 3),
    "backbone.fpn_lateral2.weight": (256, 256, 1, 1),
    "backbone.fpn_lateral5.bias": (256,),
    "backbone.fpn_output3.weight": (256, 256, 3, 3),
}


@pytest.fixture(scope="module")
def backbone():
    from damo_plugins.keypoints.backbone import ResNet50FPN

    torch.manual_seed(0)
    return ResNet50FPN().eval()


def test_backbone_loads_detectron2_names(backbone, tmp_path) -> None:
    own = {"backbone." + k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    for name, shape in D2_BACKBONE.items():
        assert own.get(name) == shape, name
    assert len(own) == 53 * 5 + 8 * 2  # 53 convs with 4 norm buffers each, 8 FPN convs
    g = np.random.default_rng(0)
    state = {k: g.normal(0, 0.05, s).astype(np.float32) for k, s in own.items()}
    state["roi_heads.keypoint_head.score_lowres.bias"] = np.zeros(17, np.float32)
    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"model": state}, protocol=2))
    from damo_plugins.keypoints.backbone import ResNet50FPN

    loaded = ResNet50FPN()
    assert loaded.load_detectron2(path) == []
    got = loaded.state_dict()
    for name in D2_BACKBONE:
        np.testing.assert_array_equal(got[name[len("backbone.") :]].numpy(), state[name])


@pytest.mark.slow
def test_backbone_exports_with_any_image_size(backbone) -> None:
    """R50-FPN (random weights) in ORT and OpenVINO vs eager; P2 is compared, which the
    top-down path makes depend on every stage. ~10 s (tracing ResNet-50), hence slow."""
    proto = export_keypoint_model(backbone, opset=17)
    runs = {"onnxruntime": ort_runner(proto), "openvino": openvino_runner(proto)}
    for h, w in ((96, 128), (75, 150)):  # 75 x 150 is padded to 96 x 160 inside the graph
        image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h)) * 255
        with torch.no_grad():
            ref = [t.numpy() for t in backbone(image)]
        padded = -(-h // 32) * 32
        expect = [padded // s for s in (4, 8, 16, 32)]
        expect.append(-(-expect[-1] // 2))  # P6: stride-2 subsampling of P5
        assert [r.shape[2] for r in ref] == expect
        for name, run in runs.items():
            sess_out = run([image.numpy()])  # first output (P2) from the runner
            scale = np.abs(ref[0]).max()
            np.testing.assert_allclose(sess_out, ref[0], atol=1e-4 * scale, err_msg=name)
