"""The ``prune`` pass: real channel removal, ONNX Runtime parity, rebuild, commuting with reparam."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from damo_plugins.artifact import build_model, load_model
from damo_plugins.data.synthetic import generate
from damo_plugins.errors import DamoError
from damo_plugins.manager import get_manager
from damo_plugins.models.damo_yolo import build_damo_yolo_t
from damo_plugins.passes.base import PassContext
from damo_plugins.passes.export import export_onnx
from damo_plugins.passes.prune import PrunePass
from damo_plugins.passes.reparam import ReparamPass

SIZE = 96


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def art():
    a = build_model(
        "damo-yolo-t",
        build_damo_yolo_t,
        input_shape=[1, 3, SIZE, SIZE],
        model_args={"num_classes": 6, "width": 0.25},
    )
    _randomize_bn(a.model)
    return a


def _ctx(tmp_path) -> PassContext:
    return PassContext(manager=get_manager(), workdir=tmp_path, log=lambda s: None)


@pytest.fixture(scope="module")
def pruned(art, tmp_path_factory):
    ctx = _ctx(tmp_path_factory.mktemp("p"))
    p = PrunePass({"ratio": 0.3})
    out = p.run(art, ctx)
    return p, out, ctx


def test_prune_removes_about_ratio_of_channels(art, pruned):
    p, out, ctx = pruned
    m = ctx.extra
    assert m["channels_removed"] == pytest.approx(0.3, abs=0.03)
    assert m["params_after"] < 0.75 * m["params_before"]
    assert m["flops_after"] < 0.8 * m["flops_before"]
    # the input artifact is untouched; the pruned model is plain dense convs
    assert art.param_count() == m["params_before"]
    assert all(type(c) is nn.Conv2d for c in out.model.modules() if isinstance(c, nn.Conv2d))
    ver = p.verify(art, out, ctx)
    assert ver.passed, ver.message
    # RepConvs know their new sizes (fusing reads them)
    for mod in out.model.modules():
        if hasattr(mod, "rbr_dense"):
            assert mod.out_channels == mod.rbr_dense.conv.out_channels


def test_pruned_model_exports_and_matches_in_onnxruntime(pruned):
    import onnxruntime as ort

    _, out, _ = pruned
    proto = export_onnx(out)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(0, 255, (1, 3, SIZE, SIZE)).astype(np.float32)
    with torch.no_grad():
        ref = [t.numpy() for t in out.model(torch.from_numpy(x))]
    got = sess.run(None, {sess.get_inputs()[0].name: x})
    for r, g in zip(ref, got):
        assert np.abs(r - g).max() <= 1e-4 * max(np.abs(r).max(), 1.0)


def test_prune_then_reparam_commute_and_rebuild_from_checkpoint(pruned, tmp_path):
    _, out, ctx = pruned
    fused = ReparamPass({}).run(out, ctx)
    x = torch.rand(1, 3, SIZE, SIZE) * 255
    with torch.no_grad():
        a, b = out.model(x), fused.model(x)
    for s, t in zip(a, b):
        assert float((s - t).abs().max()) <= 1e-4 * max(float(s.abs().max()), 1.0)
    # a safe checkpoint of (prune -> reparam) rebuilds: both transforms replay, weights load
    assert [t["pass"] for t in fused.arch["transforms"]] == ["prune", "reparam"]
    path = fused.save(tmp_path)
    loaded = load_model(path)
    with torch.no_grad():
        c = loaded.model(x)
    for s, t in zip(b, c):
        assert torch.equal(s, t)


def test_reparam_then_prune_also_rebuilds(art, tmp_path):
    ctx = _ctx(tmp_path)
    fused = ReparamPass({}).run(art, ctx)
    with pytest.raises(DamoError, match="needs BatchNorm"):
        PrunePass({"ratio": 0.5, "importance": "bn"}).run(fused, ctx)
    out = PrunePass({"ratio": 0.5, "importance": "l2", "scope": "global"}).run(fused, ctx)
    assert ctx.extra["params_after"] < ctx.extra["params_before"]
    loaded = load_model(out.save(tmp_path))
    x = torch.rand(1, 3, SIZE, SIZE) * 255
    with torch.no_grad():
        for s, t in zip(out.model(x), loaded.model(x)):
            assert torch.equal(s, t)


def test_iterative_pruning_with_finetuning(art, tmp_path):
    data = generate(tmp_path / "data", train=4, val=2, seed=3)
    ctx = _ctx(tmp_path)
    out = PrunePass(
        {
            "ratio": 0.4,
            "steps": 2,
            "importance": "l2",
            "finetune_epochs": 1,
            "batch_size": 4,
            "data": str(data),
            "round_to": 2,
        }
    ).run(art, ctx)
    m = ctx.extra
    for key in ("mAP_before", "mAP_pruned", "mAP_finetuned"):
        assert 0.0 <= m[key] <= 1.0
    assert m["channels_removed"] == pytest.approx(0.4, abs=0.06)
    assert out.model(torch.zeros(1, 3, SIZE, SIZE))[0].shape[-1] == 6


def test_prune_reports_bad_input(art, tmp_path):
    with pytest.raises(DamoError, match="no module named"):
        PrunePass({"ratio": 0.3, "ignore": ["nope"]}).run(art, _ctx(tmp_path))
    with pytest.raises(DamoError, match="needs data"):
        PrunePass({"ratio": 0.3, "finetune_epochs": 1}).run(art, _ctx(tmp_path))
