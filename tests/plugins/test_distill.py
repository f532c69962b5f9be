"""The ``distill`` pass: CWD/MSE losses, align convs, the frozen teacher, the exported student."""

from __future__ import annotations

import itertools

import pytest
import torch

from damo_plugins.core.artifact import build_model
from damo_plugins.core.manager import get_manager
from damo_plugins.core.passes import PassContext
from damo_plugins.models.damo_yolo import build_damo_yolo_t
from damo_plugins.plugins.distill import DistillPass
from damo_plugins.train.distill import (
    FeatureDistiller,
    cwd_loss,
    distill,
    feature_channels,
    loss_weight,
    mse_loss,
    normalize,
)
from damo_plugins.train.loop import TrainConfig, save_checkpoint
from tests.plugins.conftest import synth_splits

SIZE = 96


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth_splits(tmp_path_factory.mktemp("synth"), SIZE, seed=2)


def _feats(seed: int, channels=(8, 16, 32)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, s, s, generator=g) for c, s in zip(channels, (12, 6, 3))]


def test_losses_zero_for_equal_features_positive_otherwise():
    a, b = _feats(0), _feats(1)
    for x, y in zip(a, b):
        xn, yn = normalize(x), normalize(y)
        assert float(cwd_loss(xn, xn)) == pytest.approx(0.0, abs=1e-6)
        assert float(mse_loss(xn, xn)) == 0.0
        assert float(cwd_loss(xn, yn)) > 1e-3 and float(mse_loss(xn, yn)) > 1e-3
    # with identity align convs the distiller sees equal features as equal
    d = FeatureDistiller([8, 16, 32], [8, 16, 32])
    with torch.no_grad():
        for conv in d.align:
            conv.weight.copy_(torch.eye(conv.in_channels)[:, :, None, None])
            conv.bias.zero_()
    with torch.no_grad():
        assert float(d(a, a)) == pytest.approx(0.0, abs=1e-5)
        assert float(d(a, b)) > 1e-3


def test_gradients_reach_the_align_convs():
    s, t = _feats(0, (8, 16, 32)), _feats(1, (12, 24, 48))
    for loss in ("cwd", "mse"):
        d = FeatureDistiller([8, 16, 32], [12, 24, 48], loss=loss)
        d(s, t).backward()
        for conv in d.align:
            assert conv.weight.grad is not None and float(conv.weight.grad.abs().sum()) > 0
            assert conv.bias.grad is not None


def test_loss_weight_decays_by_cosine():
    assert loss_weight(0.0) == pytest.approx(1.0)
    assert loss_weight(0.5) == pytest.approx(0.55)
    assert loss_weight(1.0) == pytest.approx(0.1)
    ws = [loss_weight(i / 10) for i in range(11)]
    assert all(a > b for a, b in itertools.pairwise(ws))


def test_distill_trains_student_with_frozen_teacher(data):
    _, train_set, _ = data
    torch.manual_seed(0)
    student = build_damo_yolo_t(num_classes=6, width=0.25)
    teacher = build_damo_yolo_t(num_classes=6, width=0.375).eval()
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_before = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-3, warmup_iters=1)
    trained, distiller, res = distill(student, teacher, train_set, cfg, log=lambda s: None)
    assert res.history[0]["extra"] > 0  # the feature loss took part
    assert not teacher.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, t_before[k]), k  # weights and BN statistics untouched
    assert set(trained.state_dict()) == set(s_before)  # no align convs in the student
    assert any(not torch.equal(v, s_before[k]) for k, v in trained.state_dict().items())
    assert [c.in_channels for c in distiller.align] == feature_channels(student, SIZE)
    assert [c.out_channels for c in distiller.align] == feature_channels(teacher, SIZE)


def test_distill_pass_with_a_checkpoint_teacher(data, tmp_path):
    root, _, _ = data
    torch.manual_seed(1)
    teacher = build_damo_yolo_t(num_classes=6, width=0.375)
    arch = {
        "builder": "damo-yolo-t",
        "kwargs": {"num_classes": 6, "width": 0.375},
        "transforms": [],
    }
    ckpt = save_checkpoint(tmp_path / "teacher.pt", teacher, arch, [1, 3, SIZE, SIZE], {})
    art = build_model(
        "damo-yolo-t",
        build_damo_yolo_t,
        input_shape=[1, 3, SIZE, SIZE],
        model_args={"num_classes": 6, "width": 0.25},
    )
    ctx = PassContext(manager=get_manager(), workdir=tmp_path, log=lambda s: None)
    p = DistillPass(
        {"teacher": str(ckpt), "data": str(root), "epochs": 1, "batch_size": 4, "loss": "mse"}
    )
    out = p.run(art, ctx)
    assert set(out.model.state_dict()) == set(art.model.state_dict())
    assert out.arch == art.arch  # the student's architecture is unchanged
    ver = p.verify(art, out, ctx)
    assert ver.passed and "teacher_mAP" in ctx.extra and "mAP" in ctx.extra
