"""Params, FLOPs and output shapes without running the model (``damo-opt info``, reports).

``ModelArtifact.summary()`` counts on the meta device and :func:`describe` builds registered
models there; both must give exactly the numbers a real forward pass gives, leave a real
model untouched, and fall back to real weights for models that do not work on meta.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from damo_plugins.core.artifact import describe, load_model
from damo_plugins.core.errors import DamoError
from damo_plugins.core.hookspecs import hookimpl
from damo_plugins.core.manager import PluginManager, get_manager


def _real_counts(model: nn.Module, shape: list[int]) -> tuple[list[list[int]], int]:
    """The reference: output shapes at ``shape`` and FLOPs at batch 1, from real passes."""
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(shape))
        with FlopCounterMode(display=False) as counter:
            model(torch.randn([1, *shape[1:]]))
    flat = list(out) if isinstance(out, (tuple, list)) else [out]
    return [list(t.shape) for t in flat], int(counter.get_total_flops())


@pytest.mark.parametrize(
    ("name", "kwargs", "shape"),
    [
        ("tiny-cnn", {}, [1, 3, 64, 64]),
        ("damo-yolo-t", {"num_classes": 3, "width": 0.25}, [2, 3, 128, 160]),
        ("damo-yolo-t", {"num_classes": 3, "width": 0.25, "deploy": True}, [1, 3, 96, 96]),
        ("damo-yolo-m", {"num_classes": 2, "width": 0.25, "depth": 0.5}, [1, 3, 64, 64]),
    ],
)
def test_describe_equals_a_real_forward_pass(
    name: str, kwargs: dict[str, Any], shape: list[int]
) -> None:
    info = describe(name, input_shape=shape, model_args=kwargs)
    real = load_model(name, input_shape=shape, model_args=kwargs)
    shapes, flops = _real_counts(real.model, shape)
    assert info["flops"] == flops  # exact: counted from the same ops on the same shapes
    assert info["params"] == sum(p.numel() for p in real.model.parameters())
    assert [o["shape"] for o in info["outputs"]] == shapes
    assert all(o["dtype"] == "float32" for o in info["outputs"])
    assert info["inputs"] == [{"name": "images", "shape": shape, "dtype": "float32"}]
    # the summary of the real model (meta copy) says the same
    assert real.summary() == info


def test_summary_leaves_the_real_model_untouched() -> None:
    art = load_model("damo-yolo-t", input_shape=[1, 3, 64, 64], model_args={"width": 0.25})
    model = art.model.train()
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    summary = art.summary()
    assert summary["flops"] > 0 and art.model is model and model.training
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    after = model.state_dict()
    assert all(not v.is_meta and torch.equal(v, after[k]) for k, v in before.items())


class _Recorder:
    """A plugin whose builders note the default device they were called under."""

    def __init__(self) -> None:
        self.devices: list[str] = []

    @hookimpl
    def damo_models(self) -> dict[str, Any]:
        def plain(**kw: Any) -> nn.Module:
            self.devices.append(str(torch.get_default_device()))
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))

        def reads_values(**kw: Any) -> nn.Module:
            # a builder that looks at tensor values cannot work on meta
            self.devices.append(str(torch.get_default_device()))
            conv = nn.Conv2d(3, 4, 3)
            if float(conv.weight.abs().sum().item()) < 0:
                raise AssertionError("unreachable")
            return nn.Sequential(conv, nn.ReLU())

        def data_dependent(**kw: Any) -> nn.Module:
            self.devices.append(str(torch.get_default_device()))
            return _DataDependent()

        plain.default_input_shape = [1, 3, 16, 16]  # type: ignore[attr-defined]
        reads_values.default_input_shape = [1, 3, 16, 16]  # type: ignore[attr-defined]
        data_dependent.default_input_shape = [1, 3, 16, 16]  # type: ignore[attr-defined]
        return {"plain": plain, "reads-values": reads_values, "data-dependent": data_dependent}


class _DataDependent(nn.Module):
    """A forward pass whose control flow depends on values: meta tensors have none."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if bool(y.mean() > -1e9) else -y


@pytest.fixture
def recorder() -> tuple[PluginManager, _Recorder]:
    mgr = PluginManager(load_entry_points=False)
    rec = _Recorder()
    mgr.register(rec, "recorder")
    return mgr, rec


def test_describe_builds_registered_models_on_meta(
    recorder: tuple[PluginManager, _Recorder],
) -> None:
    mgr, rec = recorder
    info = describe("plain", manager=mgr)
    assert rec.devices == ["meta"]  # built once, without weights
    real = load_model("plain", manager=mgr)
    assert info == real.summary()
    assert info["params"] == 3 * 4 * 9 + 4 + 4 * 2 + 2
    assert info["outputs"] == [{"name": "output0", "shape": [1, 2, 14, 14], "dtype": "float32"}]


@pytest.mark.parametrize("name", ["reads-values", "data-dependent"])
def test_describe_falls_back_to_real_weights(
    recorder: tuple[PluginManager, _Recorder], name: str
) -> None:
    mgr, rec = recorder
    info = describe(name, manager=mgr)
    assert rec.devices == ["meta", "cpu"]  # tried on meta, then built for real
    real = load_model(name, manager=mgr)
    shapes, flops = _real_counts(real.model, [1, 3, 16, 16])
    assert info["flops"] == flops and [o["shape"] for o in info["outputs"]] == shapes
    assert info["params"] == sum(p.numel() for p in real.model.parameters())


def test_summary_of_a_data_dependent_model_runs_it_for_real(
    recorder: tuple[PluginManager, _Recorder],
) -> None:
    mgr, _ = recorder
    art = load_model("data-dependent", manager=mgr)
    shapes, flops = _real_counts(art.model, [1, 3, 16, 16])
    assert art.flops() == flops
    art.infer_output_specs()
    assert [o.shape for o in art.outputs] == shapes


def test_describe_errors_are_the_real_ones(recorder: tuple[PluginManager, _Recorder]) -> None:
    mgr, rec = recorder
    with pytest.raises(DamoError, match="did you mean 'plain'"):
        describe("plane", manager=mgr)
    assert rec.devices == []
    with pytest.raises(DamoError, match="does not accept"):
        describe("tiny-cnn", manager=get_manager(), model_args={"depth": 3})


def test_describe_of_files_loads_them(tmp_path: Path) -> None:
    from damo_plugins.core.artifact import onnx_artifact
    from damo_plugins.lib.onnx_export import export_onnx

    art = load_model("tiny-cnn")
    from_ckpt = describe(art.save(tmp_path, stem="m"))
    assert from_ckpt == art.summary() and from_ckpt["flops"] > 0
    info = describe(onnx_artifact(export_onnx(art)).save(tmp_path, stem="m"))
    assert info["format"] == "onnx" and info["flops"] == from_ckpt["flops"]  # from the graph
    assert info["inputs"] == [{"name": "images", "shape": [1, 3, 64, 64], "dtype": "float32"}]


def test_flops_of_a_detector_agree_across_formats(tmp_path: Path) -> None:
    """FLOPs of an export and of its IR are counted from the graph as torch counts the model
    (2 x MACs of convolutions and matrix products), so ``info`` gives one number for all three
    (the DFL matrix-vector product, which torch's counter does not count, is left out too)."""
    from damo_plugins.api import run_pass

    art = load_model("damo-yolo-t", model_args={"width": 0.25}, input_shape=[1, 3, 128, 160])
    fused = run_pass("reparam", art).artifact
    onnx_art = run_pass("export", fused).artifact
    ir = run_pass("convert", onnx_art, to="openvino").artifact
    counts = [fused.flops(), onnx_art.flops(), ir.flops()]
    assert counts[0] and counts[0] > 10**7 and counts == [counts[0]] * 3, counts
    assert describe(ir.save(tmp_path, stem="m"))["flops"] == counts[0]  # and after loading it
