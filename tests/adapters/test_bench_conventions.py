"""``damo-opt bench`` and ``damo-opt devices`` conventions (issue 19 item 6, issue 14 item 8).

* latency and throughput in one run, both in ``--json``; ``--batch`` on OpenVINO and ONNX
  Runtime;
* dynamic exports (``--dynamic-batch``, ``--dynamic``) measured at the shape asked for, or
  at the shape the export recorded; a dynamic size with neither is one clear line;
* zero or negative measuring budgets refused with one line;
* ``devices`` lists only devices present.

Every measurement here is real (OpenVINO and ONNX Runtime on the CPU) and short
(``--iterations`` of a few runs): the numbers are not compared with each other, only the
shapes really run (``output_shapes``, read back from the backend after the last inference)
and the bookkeeping (images/s = inferences/s x batch). That is what fails when a dynamic
input is fed the wrong way: OpenVINO then ran batch 0 and still timed something.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import pytest

from damo_plugins.cli import main
from damo_plugins.core.artifact import load_model
from damo_plugins.core.errors import DamoError
from damo_plugins.core.manager import get_manager
from damo_plugins.lib.onnx_export import INPUT_SHAPE_KEY, export_onnx
from damo_plugins.lib.timing import check_budget, measure_latency
from tests.conftest import damo_opt

#: tiny-cnn: input images [1, 3, 64, 64] -> logits [N, 10], features [N, 8, H/2, W/2]
FAST = ["--iterations", "4", "--warmup", "1"]


def _export(path: Path, **dynamic: bool) -> Path:
    """A real export of tiny-cnn (the code ``damo-opt export`` runs), written to ``path``."""
    proto = export_onnx(load_model("tiny-cnn"), **dynamic)
    onnx.save(proto, str(path))
    return path


def _to_ir(onnx_path: Path) -> Path:
    """The ONNX file converted to OpenVINO IR by the adapter and saved beside it."""
    ov = get_manager().get_adapter("openvino")
    art = ov.convert(load_model(onnx_path))
    xml = onnx_path.with_suffix(".xml")
    ov.save(art, xml)
    return xml


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    out = {
        "static": _export(root / "static.onnx"),
        "dyn_batch": _export(root / "dyn_batch.onnx", dynamic_batch=True),
        "dynamic": _export(root / "dynamic.onnx", dynamic_batch=True, dynamic_size=True),
    }
    out["static_ir"] = _to_ir(out["static"])
    out["dyn_batch_ir"] = _to_ir(out["dyn_batch"])
    out["dynamic_ir"] = _to_ir(out["dynamic"])
    # the same fully dynamic model without the recorded export shape
    bare = onnx.load(str(out["dynamic"]))
    keep = [p for p in bare.metadata_props if p.key != INPUT_SHAPE_KEY]
    del bare.metadata_props[:]
    bare.metadata_props.extend(keep)
    out["dynamic_bare"] = root / "dynamic_bare.onnx"
    onnx.save(bare, str(out["dynamic_bare"]))
    return out


def _bench(capsys: pytest.CaptureFixture[str], *args: Any) -> dict[str, Any]:
    rc = main(["bench", *map(str, args), *FAST, "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out)


def _error(capsys: pytest.CaptureFixture[str], *args: Any) -> str:
    """Run ``bench`` expecting the one-line error; return it."""
    rc = main(["bench", *map(str, args), *FAST])
    captured = capsys.readouterr()
    assert rc == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("damo-opt: error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def _ran_at(stats: dict[str, Any], shape: list[int]) -> None:
    """The measurement says it ran at ``shape``, and the backend's outputs agree."""
    assert stats["input_shape"] == shape
    assert stats["batch"] == shape[0]
    logits, features = stats["output_shapes"]
    assert logits == [shape[0], 10]
    assert features == [shape[0], 8, shape[2] // 2, shape[3] // 2]


# --------------------------------------------------------------- latency + throughput
def test_bench_reports_latency_and_throughput_as_a_user_runs_it() -> None:
    proc = damo_opt("bench", "tiny-cnn", "--batch", "2", *FAST, "--json")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats["hint"] == "latency" and stats["requests"] == 1
    assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"] <= stats["max_ms"]
    _ran_at(stats, [2, 3, 64, 64])
    thr = stats["throughput"]
    assert thr["hint"] == "throughput" and thr["requests"] >= 1 and thr["streams"] >= 1
    _ran_at(thr, [2, 3, 64, 64])
    # images/s counts images, not inferences: each inference is a batch of 2
    assert thr["images_per_s"] == pytest.approx(thr["fps"] * 2, rel=1e-12)
    assert stats["images_per_s"] == thr["images_per_s"] > 0

    text = damo_opt("bench", "tiny-cnn", "--adapter", "onnxruntime", *FAST)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.strip().splitlines()
    assert lines[0].startswith("onnxruntime CPU [1, 3, 64, 64]")
    assert lines[1].strip().startswith("latency: median ")
    assert lines[2].strip().startswith("throughput: ") and "images/s (batch 1" in lines[2]


def test_hint_measures_one_mode(capsys: pytest.CaptureFixture[str]) -> None:
    stats = _bench(capsys, "tiny-cnn", "--hint", "throughput")
    assert stats["hint"] == "throughput" and "throughput" not in stats
    assert stats["images_per_s"] == pytest.approx(stats["fps"], rel=1e-12)  # batch 1


@pytest.mark.parametrize("adapter", ["openvino", "onnxruntime"])
def test_batch_on_a_dynamic_batch_export(models, adapter, capsys) -> None:
    stats = _bench(capsys, models["dyn_batch"], "--adapter", adapter, "--batch", 3)
    assert stats["dynamic_input"] is True
    _ran_at(stats, [3, 3, 64, 64])
    _ran_at(stats["throughput"], [3, 3, 64, 64])
    # no --batch: a dynamic batch is measured at batch 1
    _ran_at(_bench(capsys, models["dyn_batch"], "--adapter", adapter), [1, 3, 64, 64])


def test_dynamic_batch_ir(models, capsys) -> None:
    """The case that failed with OpenVINO's "Batch size is zero": an IR with a dynamic batch."""
    stats = _bench(capsys, models["dyn_batch_ir"], "--batch", 2)
    assert stats["dynamic_input"] is True and stats["reshaped"] is False
    _ran_at(stats, [2, 3, 64, 64])
    _ran_at(stats["throughput"], [2, 3, 64, 64])


@pytest.mark.parametrize("which", ["dynamic", "dynamic_ir"])
def test_dynamic_size_at_the_recorded_shape_or_imgsz(models, which, capsys) -> None:
    adapter = "onnxruntime" if which == "dynamic" else "openvino"
    _ran_at(_bench(capsys, models[which], "--adapter", adapter), [1, 3, 64, 64])  # recorded
    _ran_at(_bench(capsys, models[which], "--adapter", adapter, "--imgsz", 32), [1, 3, 32, 32])
    shaped = _bench(capsys, models[which], "--adapter", adapter, "--input-shape", "2,3,96,64")
    _ran_at(shaped, [2, 3, 96, 64])


def test_dynamic_size_without_a_shape_names_the_flag(models, capsys) -> None:
    for adapter in ("openvino", "onnxruntime"):
        line = _error(capsys, models["dynamic_bare"], "--adapter", adapter)
        assert "is dynamic" in line and "--imgsz N" in line and "--input-shape" in line
    # the flags still work on it
    _ran_at(_bench(capsys, models["dynamic_bare"], "--imgsz", 64), [1, 3, 64, 64])


def test_static_models_and_another_batch(models, capsys) -> None:
    # OpenVINO reshapes a static model (batch 1 -> 2), and says so
    for key in ("static", "static_ir"):
        stats = _bench(capsys, models[key], "--batch", 2)
        assert stats["reshaped"] is True and stats["dynamic_input"] is False
        _ran_at(stats, [2, 3, 64, 64])
    # ONNX Runtime cannot: one line that says what to do
    line = _error(capsys, models["static"], "--adapter", "onnxruntime", "--batch", 2)
    assert "fixed batch of 1" in line and "--dynamic-batch" in line
    line = _error(capsys, models["static"], "--input-shape", "1,3,64")
    assert "--input-shape [1, 3, 64] has 3 dimensions" in line


# ------------------------------------------------------------------- bad budgets
@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--iterations", "0"),
        ("--iterations", "-5"),
        ("--seconds", "-1"),
        ("--seconds", "0"),
        ("--seconds", "inf"),
        ("--seconds", "nan"),
        ("--warmup", "-1"),
        ("--batch", "0"),
        ("--imgsz", "-3"),
        ("--requests", "0"),
        ("--streams", "-2"),
    ],
)
def test_bad_budget_is_one_line(flag, value, capsys) -> None:
    rc = main(["bench", "tiny-cnn", flag, value])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith(f"damo-opt: error: {flag}: ") and len(err.splitlines()) == 1


def test_budget_checked_for_python_callers_too() -> None:
    for bad in ({"iterations": 0}, {"seconds": -1.0}, {"seconds": float("inf")}, {"warmup": -1}):
        with pytest.raises(ValueError):
            check_budget(**bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            measure_latency(lambda: None, **bad)  # type: ignore[arg-type]
    art = load_model("tiny-cnn")
    for name in ("openvino", "onnxruntime"):
        with pytest.raises(DamoError, match="seconds must be a positive number"):
            get_manager().get_adapter(name).benchmark(art, seconds=-1.0)
    assert measure_latency(lambda: None, iterations=3, warmup=0)["count"] == 3


# ------------------------------------------------------------------------ devices
def test_devices_lists_only_devices_present(capsys: pytest.CaptureFixture[str]) -> None:
    from damo_plugins.lib.openvino_graph import ov_core

    present = {d.split(".")[0] for d in ov_core().available_devices}
    assert main(["devices", "--json"]) == 0
    rows = {r["adapter"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["openvino"]["devices"] == list(ov_core().available_devices)
    # NNCF runs nothing itself: its targets are the OpenVINO devices here, no more
    assert rows["nncf"]["devices"] == [d for d in ("CPU", "GPU", "NPU") if d in present]
    for name in ("openvino", "nncf", "inc"):  # (ONNX Runtime's GPU is CUDA's: not OpenVINO's)
        assert set(rows[name]["devices"]) <= present | {"CPU"}, rows[name]
    import onnxruntime as ort

    gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    assert rows["onnxruntime"]["devices"] == ["CPU", *(["GPU"] if gpu else [])]
    assert rows["onnxruntime"]["providers"] == ort.get_available_providers()


# --------------------------------------------------------------------- recipe step
def test_recipe_step_measures_the_hint_or_both(tmp_path: Path) -> None:
    from damo_plugins.core.passes import PassContext
    from damo_plugins.core.runner import run_step
    from damo_plugins.plugins.benchmark import BenchmarkPass

    mgr = get_manager()
    art = load_model("tiny-cnn")
    ctx = PassContext(manager=mgr, workdir=tmp_path, log=lambda _: None)
    base = {"adapter": "onnxruntime", "iterations": 3, "warmup": 0}
    one = run_step(BenchmarkPass(BenchmarkPass.validate_config(base, mgr)), art, ctx)
    assert one.metrics["benchmark"]["hint"] == "latency"
    assert "throughput" not in one.metrics["benchmark"]  # a recipe's default: the hint only
    cfg = BenchmarkPass.validate_config({**base, "both": True, "batch": 2}, mgr)
    both = run_step(BenchmarkPass(cfg), art, PassContext(manager=mgr, workdir=tmp_path))
    stats = both.metrics["benchmark"]
    _ran_at(stats, [2, 3, 64, 64])
    _ran_at(stats["throughput"], [2, 3, 64, 64])
    assert both.verification is not None and both.verification.passed
    message = both.verification.message
    assert "\n" not in message and "latency per batch of 2" in message and "images/s" in message
