"""DAMO-YOLO model family: official figures, shapes, checkpoints, structures."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from damo_plugins.core.artifact import load_model
from damo_plugins.core.errors import DamoError
from damo_plugins.core.manager import get_manager
from damo_plugins.models.damo_yolo import (
    build_damo_yolo,
    preset_structure,
    scale_structure,
)
from damo_plugins.models.structure import dumps_text

# Official figures (params in M, GFLOPs = 2 x MACs at 640x640): unfused, fused.
OFFICIAL = {
    "t": ((8.876, 18.98), (8.48, 18.01)),
    "s": ((16.94, 39.65), (16.25, 37.62)),
    "m": ((29.24, 63.88), (28.18, 61.62)),
}


def _params_gflops(preset: str, deploy: bool) -> tuple[float, float]:
    """Count on the meta device: no memory, no arithmetic, exact shapes."""
    with torch.device("meta"):
        model = build_damo_yolo(preset=preset, deploy=deploy).eval()
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, 640, 640))
    return sum(p.numel() for p in model.parameters()) / 1e6, counter.get_total_flops() / 1e9


@pytest.mark.parametrize("preset", ["t", "s", "m"])
@pytest.mark.parametrize("deploy", [False, True], ids=["unfused", "fused"])
def test_params_and_flops_match_official(preset: str, deploy: bool) -> None:
    params, gflops = _params_gflops(preset, deploy)
    want_params, want_gflops = OFFICIAL[preset][deploy]
    assert params == pytest.approx(want_params, rel=0.01)
    assert gflops == pytest.approx(want_gflops, rel=0.01)


def test_builders_are_registered_with_input_shape() -> None:
    mgr = get_manager()
    for name in ("damo-yolo", "damo-yolo-t", "damo-yolo-s", "damo-yolo-m"):
        builder = mgr.get_model_builder(name)
        assert builder.default_input_shape == [1, 3, 640, 640]


@pytest.fixture(scope="module")
def tiny_t() -> torch.nn.Module:
    return build_damo_yolo(preset="t", num_classes=3).eval()


def test_output_shapes_and_decode(tiny_t: torch.nn.Module) -> None:
    x = torch.rand(2, 3, 320, 256)
    with torch.no_grad():
        scores, boxes = tiny_t(x)
    anchors = 40 * 32 + 20 * 16 + 10 * 8
    assert scores.shape == (2, anchors, 3) and boxes.shape == (2, anchors, 4)
    assert float(scores.min()) >= 0 and float(scores.max()) <= 1
    # Fresh head: box logits are near zero, so each box is ~8 bins wide around its anchor.
    assert torch.all(boxes[..., 2] >= boxes[..., 0]) and torch.all(boxes[..., 3] >= boxes[..., 1])
    assert tiny_t.input_names == ["images"] and tiny_t.output_names == ["scores", "boxes"]


def test_decode_matches_reference_math(tiny_t: torch.nn.Module) -> None:
    """Boxes = anchor -/+ expectation over bins x stride (anchors at cell corners)."""
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cls, reg, points, strides = tiny_t.raw_outputs(x)
        scores, boxes = tiny_t(x)
    assert points.shape == strides.shape == (1, 16 * 16 + 8 * 8 + 4 * 4, 4)
    assert strides[0, 0].tolist() == [8.0] * 4 and strides[0, -1].tolist() == [32.0] * 4
    assert points[0, 17].tolist() == [8.0, 8.0, 8.0, 8.0]  # row 1, column 1 of stride 8
    dist = (reg.softmax(-1) * torch.arange(17.0)).sum(-1) * strides
    want = torch.cat([points[..., :2] - dist[..., :2], points[..., 2:] + dist[..., 2:]], -1)
    # Boxes are ~100 px; the head sums the bins in another order (float32), so compare in
    # pixels: 1e-4 px is far below anything that matters, and above float32 rounding here.
    torch.testing.assert_close(boxes, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(scores, cls.sigmoid())


def test_exported_decode_keeps_anchors_innermost(tiny_t: torch.nn.Module) -> None:
    """The bins' softmax runs per level on ``[N, 4, bins, H*W]`` (axis 2), not on a flattened
    ``[N, A, 4, bins]`` (see the head's docstring: 4x faster in OpenVINO)."""
    from damo_plugins.api import load
    from damo_plugins.lib.onnx_export import export_onnx

    proto = export_onnx(load(tiny_t, input_shape=[1, 3, 64, 64]), opset=17)
    softmax = [n for n in proto.graph.node if n.op_type == "Softmax"]
    assert len(softmax) == 3
    assert all(a.name == "axis" and a.i == 2 for n in softmax for a in n.attribute)


def test_official_state_dict_round_trip_strict(tmp_path, tiny_t: torch.nn.Module) -> None:
    """An official-style checkpoint ({'model': state_dict}) loads strict, weights_only."""
    path = tmp_path / "official.pth"
    torch.save({"model": tiny_t.state_dict(), "epoch": 300}, path)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    fresh = build_damo_yolo(preset="t", num_classes=3)
    fresh.load_state_dict(payload["model"], strict=True)
    # The same file through the loader, naming the architecture.
    art = load_model(path, arch="damo-yolo-t", model_args={"num_classes": 3})
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(tiny_t(x), art.model(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # --arch alone: the builder's match_state_dict reads the 3 classes from the head
    assert load_model(path, arch="damo-yolo-t").arch["kwargs"] == {"num_classes": 3}
    with pytest.raises(DamoError, match="do not fit"):
        load_model(path, arch="damo-yolo-t", model_args={"num_classes": 80})  # head differs


def test_official_key_names(tiny_t: torch.nn.Module) -> None:
    keys = set(tiny_t.state_dict())
    for key in (
        "backbone.block_list.0.conv.conv.weight",  # Focus stem
        "backbone.block_list.1.block_list.0.conv1.conv1.weight",
        "backbone.block_list.1.block_list.0.conv2.rbr_dense.conv.weight",
        "backbone.block_list.1.block_list.0.conv2.rbr_1x1.bn.running_var",
        "backbone.block_list.5.block_list.1.conv1.conv.weight",  # SPP after the first block
        "neck.merge_3.convs.0.conv2.rbr_dense.bn.weight",
        "head.gfl_reg.2.bias",
        "head.scales.0.scale",
        "head.integral.project",
    ):
        assert key in keys, key


def test_csp_layout_names() -> None:
    with torch.device("meta"):
        m = build_damo_yolo(preset="m")
    keys = set(m.state_dict())
    assert "backbone.csp_stage.3.convstem.6.conv2.rbr_1x1.conv.weight" in keys  # stages 3+4 merged
    assert "backbone.csp_stage.4.spp.conv2.bn.bias" in keys
    assert "backbone.csp_stage.1.downsampler.conv.conv1.weight" in keys


def test_deploy_build_takes_module_fused_weights(tiny_t: torch.nn.Module) -> None:
    from damo_plugins.lib.reparam import reparameterize

    # deploy=True is upstream's deploy layout: RepConvs fused, the Focus stem still slicing
    fused, _ = reparameterize(tiny_t, "module", space_to_depth=False)
    deployed = build_damo_yolo(preset="t", num_classes=3, deploy=True)
    deployed.load_state_dict(fused.state_dict(), strict=True)


def test_structure_sources_are_equivalent(tmp_path) -> None:
    structure = preset_structure("t")
    js = tmp_path / "t.json"
    js.write_text(json.dumps(structure))
    txt = tmp_path / "t.txt"
    txt.write_text(dumps_text(structure))
    counts = set()
    for backbone in (structure, str(js), txt):
        with torch.device("meta"):
            model = build_damo_yolo(backbone, preset="t")
        counts.add(sum(p.numel() for p in model.parameters()))
    assert len(counts) == 1
    with torch.device("meta"):
        generic = build_damo_yolo(backbone=str(txt))  # no preset: neck out = backbone out
    assert generic.config.layout == "res" and generic.neck.out_channels == [96, 192, 384]
    with torch.device("meta"):
        csp = build_damo_yolo(backbone=preset_structure("m"))
    assert csp.config.layout == "csp" and csp.config.act == "silu"


def test_bad_structures_are_clear_errors(tmp_path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text(
        "[{'class': 'ConvKXBNRELU', 'in': 3, 'out': 8, 's': 1, 'k': 3}, __import__('os')]"
    )
    with pytest.raises(DamoError, match="neither JSON nor a Python literal"):
        build_damo_yolo(backbone=str(bad))
    with pytest.raises(DamoError, match="no block at stride 32"):
        build_damo_yolo(backbone=preset_structure("t")[:4])
    with pytest.raises(DamoError, match="needs a backbone"):
        build_damo_yolo()
    with pytest.raises(DamoError, match="num_classes"):
        build_damo_yolo(preset="t", num_classes=0)


def test_width_depth_small_variant() -> None:
    small = build_damo_yolo(preset="t", num_classes=5, width=0.5, depth=0.5).eval()
    scaled = scale_structure(preset_structure("t"), 0.5, 0.5)
    assert [b["out"] for b in scaled] == [16, 32, 48, 96, 96, 192]
    assert all(b["L"] == 1 for b in scaled[1:])
    n = sum(p.numel() for p in small.parameters())
    assert 1.5e6 < n < 3.5e6
    with torch.no_grad():
        scores, _ = small(torch.rand(1, 3, 256, 256))
    assert scores.shape == (1, 32 * 32 + 16 * 16 + 8 * 8, 5)


def test_rep_identity_variant() -> None:
    m = build_damo_yolo(preset="t", rep_identity=True)
    ids = [mod for mod in m.modules() if getattr(mod, "rbr_identity", None) is not None]
    # Only where in == out and stride 1: every neck RepConv of T (hidden ratio 1), no
    # backbone one (its RepConvs widen from the bottleneck).
    assert len(ids) == 15
