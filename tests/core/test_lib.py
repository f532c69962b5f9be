"""Shared algorithms of ``damo_plugins.lib``: box IoU, interleaved timing, machine description.

IoU is checked against hand-computed values and a plain-Python reference on random boxes, in
numpy and in torch (with gradients); the timer against call counts, call order and the
difference between elapsed and CPU time; the machine description against what the OS and
the installed packages say.
"""

from __future__ import annotations

import time
from importlib import metadata

import numpy as np
import pytest
import torch

from damo_plugins.lib.boxes import box_iou
from damo_plugins.lib.machine import ISA_FLAGS, describe, has_bf16, summary
from damo_plugins.lib.timing import interleave, interleaved_timing, round_ratio


# --------------------------------------------------------------------------------- IoU
def _reference_iou(a: list[float], b: list[float]) -> float:
    """IoU of two boxes the long way (zero-area boxes: 0)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def _random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    xy = rng.uniform(0, 50, (n, 2))
    wh = rng.uniform(-5, 30, (n, 2))  # some negative: degenerate boxes must give 0
    return np.concatenate([xy, xy + wh], 1)


def test_iou_known_values() -> None:
    a = np.array([[0.0, 0.0, 2.0, 2.0]])
    b = np.array([[0.0, 0.0, 2.0, 2.0], [1.0, 0.0, 3.0, 2.0], [5.0, 5.0, 6.0, 6.0], [0, 0, 1, 1]])
    np.testing.assert_allclose(box_iou(a, b), [[1.0, 1 / 3, 0.0, 0.25]], rtol=0, atol=1e-12)


def test_iou_matches_reference_numpy_and_torch() -> None:
    rng = np.random.default_rng(0)
    a, b = _random_boxes(rng, 40), _random_boxes(rng, 30)
    ref = np.array([[_reference_iou(list(x), list(y)) for y in b] for x in a])
    got = box_iou(a, b)
    assert isinstance(got, np.ndarray) and got.shape == (40, 30)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    got_t = box_iou(torch.from_numpy(a), torch.from_numpy(b))
    assert isinstance(got_t, torch.Tensor) and got_t.dtype == torch.float64
    np.testing.assert_allclose(got_t.numpy(), ref, rtol=0, atol=1e-12)
    assert ((ref == 0) | (ref > 0)).all() and not np.isnan(got).any()
    assert (ref > 0).any() and (ref == 0).any()  # the test data exercises both cases


def test_iou_empty_boxes_give_zero_not_nan() -> None:
    empty = np.array([[3.0, 3.0, 3.0, 3.0], [5.0, 5.0, 1.0, 1.0]])
    assert (box_iou(empty, empty) == 0).all()
    assert box_iou(np.zeros((0, 4)), empty).shape == (0, 2)


def test_iou_torch_keeps_gradients() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]], requires_grad=True)
    b = torch.tensor([[1.0, 0.0, 3.0, 2.0]])
    iou = box_iou(a, b)
    iou.sum().backward()
    assert a.grad is not None
    # moving a's right edge right grows the intersection by 2 per unit, and a's area by as
    # much, so the union (6) stays: d IoU / d x2 = 2 / 6
    assert float(a.grad[0, 2]) == pytest.approx(1 / 3, abs=1e-6)


def test_one_iou_implementation() -> None:
    """NMS/mAP, the assigner and the INT8 agreement all use the lib function."""
    from damo_plugins.data import evaluate
    from damo_plugins.lib import fidelity
    from damo_plugins.train import assigner

    assert evaluate.box_iou is box_iou and assigner.box_iou is box_iou
    assert fidelity.box_iou is box_iou and not hasattr(fidelity, "_iou")


# ------------------------------------------------------------------------------ timing
def test_interleave_rotates_the_order() -> None:
    calls: list[str] = []
    out = interleave({k: (lambda k=k: calls.append(k) or len(calls)) for k in "abc"}, 4)
    rounds = ["".join(calls[i : i + 3]) for i in range(0, 12, 3)]
    assert rounds == ["abc", "bca", "cab", "abc"]
    assert out == {"a": [1, 6, 8, 10], "b": [2, 4, 9, 11], "c": [3, 5, 7, 12]}
    pair: list[str] = []
    interleave({k: (lambda k=k: pair.append(k)) for k in "ab"}, 3)
    assert "".join(pair) == "abbaab"  # two variants: alternating order
    with pytest.raises(ValueError, match="at least 1"):
        interleave({"a": lambda: 0}, 0)


def test_round_ratio_is_taken_within_rounds() -> None:
    slow, fast = [2.0, 40.0, 6.0], [1.0, 10.0, 3.0]
    assert round_ratio(slow, fast) == 2.0  # per round 2, 4, 2
    assert np.median(slow) / np.median(fast) == 2.0
    drift_slow, drift_fast = [10.0, 100.0, 11.0, 110.0], [5.0, 50.0, 5.5, 55.0]
    assert round_ratio(drift_slow, drift_fast) == 2.0  # load changed 10x between rounds
    with pytest.raises(ValueError):
        round_ratio([1.0], [1.0, 2.0])


def test_interleaved_timing_counts_calls() -> None:
    counts = dict.fromkeys("ab", 0)

    def counter(k: str):
        def fn() -> None:
            counts[k] += 1

        return fn

    t = interleaved_timing({k: counter(k) for k in "ab"}, 5, calls=3, warmup=2, slot_warmup=1)
    assert counts == {"a": 2 + 5 * (1 + 3), "b": 2 + 5 * (1 + 3)}
    assert [len(r) for r in t.wall["a"]] == [3] * 5 and len(t.samples("b", "cpu")) == 15
    assert len(t.per_round("a")) == 5


def test_interleaved_timing_sizes_slots_and_separates_cpu_from_wall() -> None:
    def sleeper() -> None:  # elapsed time without CPU work
        time.sleep(0.004)

    def spinner() -> None:  # CPU work
        end = time.process_time() + 0.004
        while time.process_time() < end:
            pass

    t = interleaved_timing({"sleep": sleeper, "spin": spinner}, 3, slot_seconds=0.02)
    for key in ("sleep", "spin"):
        n = [len(r) for r in t.wall[key]]
        assert len(set(n)) == 1 and 2 <= n[0] <= 5  # ~0.02 s / >= 4 ms per call
    assert t.median("sleep") >= 4.0 - 0.1  # sleep never returns early (ms)
    assert t.median("sleep", "cpu") < 2.0  # and costs (almost) no CPU time
    assert t.median("spin", "cpu") >= 4.0 - 0.1
    summary_ = t.summary("sleep", "cpu")
    assert summary_["sleep"]["speedup"] == 1.0
    # the spinner costs far more CPU than the sleeper: its "speed-up" is far below 1
    assert summary_["spin"]["speedup"] < 0.5
    with pytest.raises(ValueError, match="clock"):
        t.median("sleep", "gpu")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- machine
def test_machine_description() -> None:
    info = describe()
    assert info["cpus"] and info["cpu"]
    assert set(info["isa"]) <= set(ISA_FLAGS)
    if info["isa_missing"]:  # the OS told us the flags: present + missing = all we look for
        assert sorted(info["isa"] + info["isa_missing"]) == sorted(ISA_FLAGS)
    assert info["versions"]["torch"] == metadata.version("torch")
    assert info["versions"]["onnxruntime"] == metadata.version("onnxruntime")
    assert info["bf16"] == ("avx512_bf16" in info["isa"] or "amx_bf16" in info["isa"])
    text = summary(info)
    assert info["cpu"] in text and f"torch {metadata.version('torch')}" in text
    assert "\n" not in text


def test_machine_openvino_precision_is_a_short_name() -> None:
    info = describe(openvino_precision=True)
    assert info["ov_cpu_default_precision"] in ("f32", "bf16", "f16")
    # OpenVINO picks bf16 by itself exactly where the CPU computes bf16 natively
    assert (info["ov_cpu_default_precision"] == "bf16") == info["bf16"]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [({"avx2", "avx512_bf16"}, True), ({"amx_bf16"}, True), ({"avx512f", "avx2"}, False)],
)
def test_has_bf16(flags: set[str], expected: bool) -> None:
    assert has_bf16(flags) is expected
