"""The Python API: every example in docs/python-api.md runs, and the functions behave."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from damo_plugins import api
from damo_plugins.core.errors import DamoError, VerificationError
from damo_plugins.demo import embedded_checkpoint
from tests.conftest import REPO

DOC = REPO / "docs" / "python-api.md"


def _examples() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


@pytest.mark.slow
def test_doc_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The examples, in order and in one namespace, as the page says; each must assert or
    produce what its text claims (they contain their own asserts)."""
    if embedded_checkpoint() is None:
        pytest.skip("this installation has no embedded demo checkpoint")
    blocks = _examples()
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    ns: dict[str, object] = {"__name__": "__doc_example__"}
    for i, code in enumerate(blocks):
        exec(
            compile(code, f"{DOC.name}[{i}]", "exec"), ns
        )  # our own docs, executed as the page says
    # what the examples left behind is what they claimed
    assert ns["art"].arch["builder"] == "damo-yolo-t"  # type: ignore[attr-defined]
    assert len(ns["scope"].names) > 5  # type: ignore[attr-defined]
    assert ns["int8_art"].format == "openvino"  # type: ignore[attr-defined]
    assert ns["stats"]["median_ms"] > 0  # type: ignore[index]


def test_decode_scope_of_onnx_matches_openvino_walk() -> None:
    """The ONNX and OpenVINO walks find a decode tail with the same signature ops; a
    classifier has none."""
    import onnx

    from damo_plugins.lib.onnx_export import export_onnx

    art = api.load("damo-yolo-t", input_shape=[1, 3, 64, 64], model_args={"width": 0.25})
    proto = export_onnx(art)
    for node in proto.graph.node:
        node.name = ""  # user exports may have no names
    scope = api.decode_ignored_scope(proto)
    ops = {n.name: n.op_type for n in proto.graph.node}
    kinds = {ops[n] for n in scope.names}
    assert {"Sigmoid", "Softmax"} <= kinds and "Conv" not in kinds
    onnx.checker.check_model(proto)  # naming in place kept the model valid
    assert api.decode_ignored_scope(export_onnx(api.load("tiny-cnn"))).names == []
    with pytest.raises(DamoError, match=r"openvino\.Model or an onnx\.ModelProto"):
        api.decode_ignored_scope(art.model)


def test_reparameterize_leaves_input_alone() -> None:
    from damo_plugins.models.damo_yolo import build_damo_yolo_t

    net = build_damo_yolo_t(width=0.25).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fused = api.reparameterize(net)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any("rbr_dense" in k for k in fused.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(net(x), fused(x)):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_run_pass_checks_and_raises_failed_verification() -> None:
    art = api.load("tiny-cnn")
    res = api.run_pass("reparam", art)
    assert res.passed and res.artifact.format == "torch"
    # an impossible mAP floor: the evaluate step's own check fails -> VerificationError
    with pytest.raises(VerificationError, match="mAP"):
        api.evaluate(
            api.load(embedded_checkpoint() or "damo-yolo-t", input_shape=[1, 3, 64, 64]),
            images=2,
            min_map=1.0,
        )
    with pytest.raises(DamoError, match="unknown pass"):
        api.run_pass("no-such-pass", art)


def test_load_wraps_in_memory_onnx_and_openvino() -> None:
    import openvino as ov

    from damo_plugins.lib.onnx_export import export_onnx

    art = api.load("tiny-cnn")
    proto = export_onnx(art)
    feeds = art.example_inputs(seed=1)
    ref = art.run(feeds)
    for model in (
        proto,
        ov.Core().read_model(proto.SerializeToString(), ov.Tensor(np.zeros(0, np.uint8))),
    ):
        got = api.load(model).run(feeds)
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-4, atol=1e-5)
