"""ONNX export: checker, parity in ONNX Runtime, dynamic batch, both exporters."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from damo_plugins.core.artifact import load_model, onnx_artifact
from damo_plugins.core.verify import compare_outputs
from damo_plugins.lib.onnx_export import export_onnx


@pytest.mark.parametrize("opset", [16, 17, 20])
def test_export_parity_in_onnxruntime(opset: int) -> None:
    art = load_model("tiny-cnn")
    proto = export_onnx(art, opset=opset)
    assert proto.opset_import[0].version == opset
    onnx.checker.check_model(proto)
    feeds = art.example_inputs(seed=3)
    m = compare_outputs(art.run(feeds), onnx_artifact(proto).run(feeds))
    assert m["max_rel"] < 1e-5, m


def test_dynamic_batch() -> None:
    art = load_model("tiny-cnn")
    o = onnx_artifact(export_onnx(art, dynamic_batch=True))
    assert o.inputs[0].shape[0] == "batch"
    feeds = art.example_inputs(batch=3)
    ref, got = art.run(feeds), o.run(feeds)
    assert got[0].shape == (3, 10)
    assert compare_outputs(ref, got)["max_rel"] < 1e-5


def test_dynamo_exporter() -> None:
    art = load_model("tiny-cnn")
    o = onnx_artifact(export_onnx(art, exporter="dynamo"))
    feeds = art.example_inputs()
    assert compare_outputs(art.run(feeds), o.run(feeds))["max_rel"] < 1e-5
    assert [t.name for t in o.outputs] == ["logits", "features"]


def test_export_does_not_touch_the_model() -> None:
    art = load_model("tiny-cnn")
    art.model.train()
    before = {k: v.clone() for k, v in art.model.state_dict().items()}
    export_onnx(art)
    assert art.model.training
    for k, v in art.model.state_dict().items():
        assert np.array_equal(v.numpy(), before[k].numpy()), k
