"""Losses, the AlignedOTA assigner and the training loop (a few steps on tiny data)."""

from __future__ import annotations

import itertools

import pytest
import torch

from damo_plugins.data.coco import collate
from damo_plugins.models.damo_yolo import build_damo_yolo_t
from damo_plugins.train.assigner import AlignedOTA
from damo_plugins.train.loop import TrainConfig, fit, load_train_state, lr_at, raw_outputs
from damo_plugins.train.losses import (
    DetectionLoss,
    distribution_focal_loss,
    giou_loss,
    quality_focal_loss,
)
from damo_plugins.train.trainer import data_splits
from tests.plugins.conftest import synth_splits

SIZE = 96


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth_splits(tmp_path_factory.mktemp("synth"), SIZE, seed=1)


def _model():
    torch.manual_seed(0)
    return build_damo_yolo_t(num_classes=6, width=0.25)


def test_loss_functions():
    t = torch.tensor([[0.0, 0.7]])
    low = quality_focal_loss(torch.logit(t.clamp(1e-4, 1 - 1e-4)), t)
    high = quality_focal_loss(torch.tensor([[3.0, -3.0]]), t)
    assert float(low.sum()) < 1e-6 < float(high.sum())
    logits = torch.full((1, 17), -10.0)
    logits[0, 3] = logits[0, 4] = 10.0
    near = distribution_focal_loss(logits, torch.tensor([3.5]))
    far = distribution_focal_loss(logits, torch.tensor([10.5]))
    assert float(near) < float(far)
    b = torch.tensor([[0.0, 0, 10, 10]])
    assert float(giou_loss(b, b)) == pytest.approx(0.0, abs=1e-6)
    assert float(giou_loss(b, b + 20)) > 1.0  # disjoint boxes: GIoU < 0


def test_assigner_picks_anchors_inside_the_object():
    # a 16x16 grid of stride-8 anchors; one object in the middle, predictions near it
    ys, xs = torch.meshgrid(torch.arange(16) * 8.0, torch.arange(16) * 8.0, indexing="ij")
    pts = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)
    strides = torch.full((256,), 8.0)
    gt = torch.tensor([[40.0, 40, 90, 90]])
    pred = torch.cat([pts - 20, pts + 20], 1)
    a = AlignedOTA()(torch.zeros(256, 3), pred, pts, strides, gt, torch.tensor([2]))
    pos = a.positive
    assert 1 <= int(pos.sum()) <= 10
    p = pts[pos]
    assert bool(((p > 40) & (p < 90)).all())
    assert bool((a.iou[pos] > 0).all()) and bool((a.iou[~pos] == 0).all())
    empty = AlignedOTA()(torch.zeros(256, 3), pred, pts, strides, torch.zeros(0, 4), torch.zeros(0))
    assert not bool(empty.positive.any())


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(lr=1.0, warmup_iters=10, min_lr_ratio=0.1)
    lrs = [lr_at(i, 100, cfg) for i in range(100)]
    assert lrs[0] < lrs[9] == pytest.approx(1.0)
    assert lrs[99] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))


def test_training_steps_lower_the_loss(data):
    _, train_set, _ = data
    model = _model().train()
    images, targets, _ = collate([train_set[i] for i in range(4)])
    loss_fn = DetectionLoss(6)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first, parts = loss_fn(raw_outputs(model, images)[1], targets)
    assert parts["num_pos"] > 0
    for _ in range(3):
        loss, _ = loss_fn(raw_outputs(model, images)[1], targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last, _ = loss_fn(raw_outputs(model, images)[1], targets)
    assert float(last.detach()) < float(first.detach())


def test_fit_checkpoints_and_resumes_exactly(data, tmp_path):
    train_set, val_set = data_splits(data[0], 64)
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-3, warmup_iters=1)
    straight = fit(
        _model(), train_set, cfg, val_set=val_set, output=tmp_path / "a", log=lambda s: None
    )
    assert len(straight.history) == 2 and "mAP" in straight.history[-1]
    # one epoch, then resume for the second
    fit(
        _model(),
        train_set,
        TrainConfig(**{**cfg.__dict__, "epochs": 1}),
        output=tmp_path / "b",
        log=lambda s: None,
    )
    state = load_train_state(tmp_path / "b" / "last.pt")  # weights_only inside
    assert state["epoch"] == 1
    resumed = fit(_model(), train_set, cfg, output=tmp_path / "b", resume=state, log=lambda s: None)
    for k, v in straight.model.state_dict().items():
        assert torch.allclose(v.float(), resumed.model.state_dict()[k].float(), atol=1e-5), k
    payload = torch.load(tmp_path / "a" / "best.pt", weights_only=True)
    assert "train_state" not in payload and payload["state_dict"]


def test_cli_train_generate_resume_and_load(tmp_path, capsys):
    from damo_plugins.cli import main
    from damo_plugins.core.artifact import load_model

    out = tmp_path / "run"
    common = ["--epochs", "1", "--batch", "4", "--img-size", "64", "--no-progress", "-o", str(out)]
    gen = ["--generate", "--data", str(tmp_path / "d"), "--train-images", "4", "--val-images", "2"]
    assert main(["train", *gen, *common]) == 0
    assert "best mAP" in capsys.readouterr().out
    art = load_model(out / "best.pt")  # a damo-plugins checkpoint: arch + EMA weights
    assert art.model.head.num_classes == 6 and art.input_shape == [1, 3, 64, 64]
    # an existing run is not overwritten; --resume continues it (data and model from the run)
    assert main(["train", *gen, *common]) == 2
    assert "already holds a training run" in capsys.readouterr().err
    resume = ["train", "--resume", "--epochs", "2", "--no-progress", "-o", str(out)]
    assert main(resume) == 0
    state = load_train_state(out / "last.pt")
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert main(["train", "-o", str(tmp_path / "x")]) == 2
    assert "no training data" in capsys.readouterr().err
