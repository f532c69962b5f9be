"""Pruning that keeps accuracy: FLOPs targets, the sensitivity analysis and its cache,
recovery with the unpruned model as teacher, and the replay of what that produces.

Small settings throughout (quarter-width DAMO-YOLO-T, 96-128 px, a few dozen generated
images, one torch thread, fixed seeds) so each test stays well under a minute.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from damo_plugins.core.artifact import load_model
from damo_plugins.core.errors import DamoError
from damo_plugins.data.synthetic import generate
from damo_plugins.plugins.prune import PrunePass
from damo_plugins.train import sensitivity as sens_mod
from damo_plugins.train.prune import block_of, conv_flops, conv_shapes, prune_copy
from damo_plugins.train.recovery import binary_kl, output_losses
from tests.plugins.conftest import ART_SIZE, pass_ctx, shipped_nano

#: the input size of ``art`` (tests/plugins/conftest.py: a random quarter-width DAMO-YOLO-T)
SIZE = ART_SIZE


def test_output_losses_vanish_for_the_teacher_itself_and_grow_with_distance():
    g = torch.Generator().manual_seed(0)
    cls = torch.randn(2, 50, 6, generator=g)
    reg = torch.randn(2, 50, 4, 17, generator=g)
    c, b = output_losses((cls, reg), (cls, reg))
    assert float(c) == pytest.approx(0.0, abs=1e-6) and float(b) == pytest.approx(0.0, abs=1e-6)
    near = output_losses((cls + 0.1, reg + 0.1 * torch.randn(reg.shape, generator=g)), (cls, reg))
    far = output_losses((cls + 1.0, reg + 1.0 * torch.randn(reg.shape, generator=g)), (cls, reg))
    assert 0 < float(near[0]) < float(far[0]) and 0 < float(near[1]) < float(far[1])
    # binary KL from logits is exact: against the closed form on probabilities
    s, t = torch.tensor([-2.0, 0.5, 3.0]), torch.tensor([1.0, 0.5, -1.0])
    p, q = t.sigmoid(), s.sigmoid()
    ref = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    assert torch.allclose(binary_kl(s, t), ref, atol=1e-6)
    with pytest.raises(DamoError, match="heads differ"):
        output_losses((cls[:, :10], reg), (cls, reg))


def test_flops_target_is_met_and_what_was_removed_is_stated(art, tmp_path):
    ctx = pass_ctx(tmp_path)
    p = PrunePass({"flops": 0.3, "steps": 2})
    out = p.run(art, ctx)
    m = ctx.extra
    # counted by torch.utils.flop_counter on the pruned model, not derived from the ratio
    assert m["flops_before"] == art.flops() and m["flops_after"] == out.flops()
    assert m["flops_removed"] == pytest.approx(1 - out.flops() / art.flops(), abs=1e-4)
    assert abs(m["flops_removed"] - 0.3) <= 0.02
    assert m["params_removed"] == pytest.approx(1 - out.param_count() / art.param_count(), abs=1e-4)
    assert [s["step"] for s in m["steps"]] == [1, 2]
    assert m["steps"][0]["flops_removed"] == pytest.approx(0.15, abs=0.02)
    ver = p.verify(art, out, ctx)
    assert ver.passed and "of FLOPs" in ver.message, ver.message
    # the shape-only FLOPs count the search uses equals the counter, pruned or not, but for
    # the decode's bin expectation (a matrix product pruning never changes)
    sizes = conv_shapes(art.model, torch.zeros(1, 3, SIZE, SIZE))
    head = art.model.head
    anchors = sum((SIZE // s) ** 2 for s in head.strides)
    decode = 2 * anchors * 4 * (head.reg_max + 1)
    assert art.flops() - conv_flops(art.model, sizes) == decode
    assert out.flops() - conv_flops(out.model, sizes) == decode


def test_unreachable_or_contradictory_targets_say_so_in_one_line(art, tmp_path):
    with pytest.raises(DamoError, match=r"removed .* of the FLOPs, asked 97%"):
        PrunePass({"flops": 0.97}).run(art, pass_ctx(tmp_path))
    with pytest.raises(DamoError, match=r"either ratio .* or flops"):
        PrunePass({"flops": 0.3, "ratio": 0.2}).run(art, pass_ctx(tmp_path))
    with pytest.raises(DamoError, match="'sensitivity' needs data"):
        PrunePass({"flops": 0.3, "allocation": "sensitivity"}).run(art, pass_ctx(tmp_path))
    with pytest.raises(DamoError, match="scope 'global'"):
        PrunePass({"flops": 0.3, "allocation": "sensitivity", "scope": "global", "data": "d"}).run(
            art, pass_ctx(tmp_path)
        )
    with pytest.raises(DamoError, match=r"recovery \(distill\) needs data"):
        PrunePass({"recovery": "distill", "finetune_epochs": 1}).run(art, pass_ctx(tmp_path))
    with pytest.raises(DamoError, match="needs finetune_epochs"):
        PrunePass({"recovery": "finetune", "data": "d"}).run(art, pass_ctx(tmp_path))
    with pytest.raises(DamoError, match="importance 'l1' ranks every candidate the same"):
        PrunePass({"flops": 0.3, "candidates": 2, "importance": "l1", "data": "d"}).run(
            art, pass_ctx(tmp_path)
        )
    with pytest.raises(DamoError, match=r"candidates .* need data"):
        PrunePass({"flops": 0.3, "candidates": 2}).run(art, pass_ctx(tmp_path))
    with pytest.raises(DamoError, match="compared at one FLOPs budget"):
        PrunePass({"ratio": 0.3, "candidates": 2, "data": "d"}).run(art, pass_ctx(tmp_path))
    # found when a recipe is loaded (``--dry-run``), located at the option
    from damo_plugins.core.passes import ConfigError

    with pytest.raises(ConfigError) as err:
        PrunePass.validate_config({"flops": 0.3, "ratio": 0.2})
    assert err.value.loc == ("flops",)


def test_allocation_prunes_sensitive_blocks_less():
    sens = sens_mod.Sensitivity(
        "k", 0.5, {"a": {"drop": 0.2}, "b": {"drop": 0.05}, "c": {"drop": -0.01}}, {}
    )
    w = sens_mod.weights(sens, 0.8)
    assert w == pytest.approx({"a": 0.2, "b": 0.8, "c": 1.0})
    r = sens_mod.allocate(w, 0.5, 0.9)
    assert r["a"] < r["b"] < r["c"] == 0.5
    assert sens_mod.allocate(w, 2.0, 0.9)["c"] == 0.9  # no layer loses more than the cap
    flat = sens_mod.Sensitivity("k", 0.0, {"a": {"drop": 0.0}, "b": {"drop": 0.0}}, {})
    assert sens_mod.weights(flat, 0.8) == {"a": 1.0, "b": 1.0}
    assert block_of("backbone.block_list.3.block_list.0.conv1.conv1") == "backbone.block_list.3"
    assert block_of("neck.merge_5.convs.2.conv1.conv") == "neck.merge_5"


def test_a_block_probe_prunes_only_that_block(art):
    x = torch.zeros(1, 3, SIZE, SIZE)
    pruned = prune_copy(art.model, x, [], "l2", per_block={"neck.merge_4": 0.5})
    changed = {
        block_of(n)
        for (n, a), (_, b) in zip(art.model.named_modules(), pruned.named_modules())
        if isinstance(a, torch.nn.Conv2d) and a.out_channels != b.out_channels
    }
    assert changed == {"neck.merge_4"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("recovery-data"), train=48, val=24, seed=5)


@pytest.fixture(scope="module")
def sensitivity_runs(data, tmp_path_factory):
    """The same sensitivity-driven pruning twice, one cache: (artifact, metrics) per run."""
    base = shipped_nano(128)
    cache = tmp_path_factory.mktemp("sens-cache")
    cfg = {
        "flops": 0.25,
        "allocation": "sensitivity",
        "importance": "l2",
        "data": str(data),
        "img_size": 128,
        "sensitivity_images": 16,
        "eval_limit": 16,
        "cache_dir": str(cache),
    }
    runs = []
    for _ in range(2):
        ctx = pass_ctx(tmp_path_factory.mktemp("sens"))
        out = PrunePass(cfg).run(base, ctx)
        runs.append((out, dict(ctx.extra)))
    return base, cache, runs


@pytest.mark.slow
def test_sensitivity_is_measured_once_then_read_from_the_cache(sensitivity_runs):
    base, cache, ((_, m1), (_, m2)) = sensitivity_runs
    s1, s2 = m1["sensitivity"], m2["sensitivity"]
    blocks = s1["drop"]
    assert len(blocks) == 16  # 6 backbone stages + 10 neck blocks of DAMO-YOLO-T
    assert s1["cached"] is False and s1["evaluations"] == len(blocks) + 1
    assert s2["cached"] is True and s2["evaluations"] == 0 and s2["seconds"] == 0
    assert s2["drop"] == blocks and s1["cache"] == s2["cache"]
    assert list(cache.glob("sensitivity-*.json")) == [Path(s1["cache"])]
    # on a trained model the blocks differ, and the most sensitive is pruned least
    assert max(blocks.values()) > 0.01
    ratios = m1["steps"][0]["ratios"]
    worst = max(blocks, key=blocks.get)
    assert ratios[worst] == min(ratios.values()) < max(ratios.values())
    assert ratios == m2["steps"][0]["ratios"]
    for m in (m1, m2):
        assert abs(m["flops_removed"] - 0.25) <= 0.02
    # other weights, other key: measured again
    key1 = Path(s1["cache"]).name
    changed = copy.deepcopy(base.model)
    with torch.no_grad():
        next(changed.parameters()).mul_(1.01)
    key2 = sens_mod.content_key(changed, [], {})
    assert key2[:32] not in key1


def test_candidates_recover_the_copy_that_keeps_the_most_control_map(data, tmp_path):
    """Each candidate ranks channels on its own augmentation of the Taylor images; the run
    keeps the one with the best control mAP, and candidate 1 is the single ranking's."""
    base = shipped_nano(128)
    cfg = {
        "flops": 0.25,
        "importance": "taylor",
        "scope": "global",
        "data": str(data),
        "img_size": 128,
        "taylor_images": 16,
        "eval_limit": 16,
    }
    one = pass_ctx(tmp_path / "one")
    single = PrunePass(cfg).run(base, one)
    many = pass_ctx(tmp_path / "many")
    chosen = PrunePass({**cfg, "candidates": 3}).run(base, many)
    step = many.extra["steps"][0]
    scores = step["candidates"]
    assert len(scores) == 3 and len(set(scores)) > 1, scores  # the streams rank differently
    assert scores[0] == one.extra["mAP_pruned"]  # stream 0: what one ranking prunes
    assert step["chosen"] == 1 + scores.index(max(scores))
    assert many.extra["mAP_pruned"] == max(scores)
    assert abs(many.extra["flops_removed"] - 0.25) <= 0.02
    if step["chosen"] == 1:
        assert chosen.flops() == single.flops()
    assert "candidates" not in one.extra["steps"][0]


def test_pruned_model_saved_and_replayed_gives_the_same_outputs(sensitivity_runs, tmp_path):
    _, _, ((out, m), _) = sensitivity_runs
    loaded = load_model(out.save(tmp_path))
    x = torch.rand(1, 3, 128, 128) * 255
    with torch.no_grad():
        for a, b in zip(out.model(x), loaded.model(x)):
            assert torch.equal(a, b)
    assert loaded.flops() == m["flops_after"]


@pytest.mark.slow
def test_the_unpruned_teacher_narrows_the_gap_left_by_plain_fine_tuning(tmp_path):
    """Same pruned model, seed, data and schedule; recovered with and without the teacher.

    Measured by the detection loss on held-out images, not mAP: at 32 images a change of a
    few detections moves mAP by ~0.005, about the difference at stake after 8 iterations,
    while the loss sums over every anchor and object. Measured here (seed 0 / 1): loss
    1.348 / 1.344 plain vs 1.311 / 1.295 with the teacher (teacher 0.860); mAP 0.195 / 0.178
    vs 0.197 / 0.185. 256 px because the shipped model was trained there: at 128 px it is a
    poor teacher (mAP 0.16) and neither recovery differs beyond noise.
    """
    from damo_plugins.train.recovery import RecoverySettings, detection_loss, recover
    from damo_plugins.train.trainer import data_splits

    base = shipped_nano(256)
    root = generate(tmp_path / "data", train=32, val=32, seed=5)
    train_set, val_set = data_splits(root, 256, seed=0)
    ctx = pass_ctx(tmp_path)
    pruned = PrunePass(
        {"flops": 0.3, "data": str(root), "taylor_images": 32, "scope": "global"}
    ).run(base, ctx)
    assert ctx.extra["recovery"] == "none"  # no epochs given: the pass only prunes
    teacher_loss = detection_loss(base.model, val_set)
    losses = {}
    for mode in ("finetune", "distill"):
        model = copy.deepcopy(pruned.model)
        settings = RecoverySettings(mode=mode, epochs=2, batch_size=8, lr=2e-4, seed=0)
        res = recover(model, base.model if mode == "distill" else None, train_set, settings)
        assert res.iterations == 8 and res.cpu_seconds > 0
        losses[mode] = detection_loss(res.model, val_set)
    pruned_loss = detection_loss(pruned.model, val_set)
    assert losses["finetune"] < pruned_loss  # both recover something...
    gap = {k: v - teacher_loss for k, v in losses.items()}
    assert gap["distill"] < 0.95 * gap["finetune"], (teacher_loss, pruned_loss, losses)
