"""``damo-opt evaluate``, ``compare`` and ``optimize``, run as a user runs them.

All on the embedded model (``damo-yolo-nano-synth.pt``, 6 classes, 256 px) and small data:
a generated COCO set in the standard layout and the same set through a dataset YAML; the
optimize end-to-end test uses ``synthetic:24,24`` (generated into a private cache) and a
tiny space (fuse + export + NNCF INT8, OpenVINO f32/bf16), is killed after its first
candidate, resumed, and its best model reproduced with ``damo-opt run best/recipe.yaml``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import assert_clean_error, damo_opt

MODEL = str(
    Path(__file__).resolve().parents[2] / "damo_plugins" / "assets" / "damo-yolo-nano-synth.pt"
)


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small COCO folder in the standard layout (images/*2017, annotations/instances_*)."""
    from damo_plugins.data.synthetic import generate

    own = generate(tmp_path_factory.mktemp("gen"), train=6, val=16, seed=0)
    root = tmp_path_factory.mktemp("coco")
    (root / "annotations").mkdir()
    for split in ("train", "val"):
        shutil.copytree(own / split, root / "images" / f"{split}2017")
        shutil.copy(own / f"{split}.json", root / "annotations" / f"instances_{split}2017.json")
    (root / "data.yaml").write_text(
        "path: .\ntrain: images/train2017\nval: images/val2017\n"
        "names: [circle, square, triangle, ring, cross, star]\n"
    )
    return root


@pytest.fixture
def cache_env(tmp_path: Path) -> dict[str, str]:
    """``synthetic`` generated into this test's folder, never the user's cache."""
    return {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "OMP_NUM_THREADS": "1"}


def _json(proc: subprocess.CompletedProcess[str]) -> object:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_evaluate_on_coco_layout_and_yaml(coco: Path) -> None:
    ov = _json(damo_opt("evaluate", MODEL, "--data", coco, "--json"))
    yml = _json(damo_opt("evaluate", MODEL, "--data", coco / "data.yaml", "--json"))
    ort = _json(damo_opt("evaluate", MODEL, "--data", coco, "--runtime", "onnxruntime", "--json"))
    assert isinstance(ov, dict) and isinstance(yml, dict) and isinstance(ort, dict)
    assert ov["images"] == 16 and ov["runtime"] == "openvino"
    # the embedded model scores ~0.41 on 300 val images; 16 images vary, but not to ~0
    assert 0.15 < ov["mAP"] < 0.9 and ov["mAP50"] >= ov["mAP"]
    assert yml["mAP"] == ov["mAP"]  # the same images by two layouts: the same number
    assert abs(ort["mAP"] - ov["mAP"]) < 2e-3  # two runtimes, f32 both


def test_evaluate_errors(coco: Path, tmp_path: Path) -> None:
    pics = tmp_path / "pics"
    shutil.copytree(coco / "images" / "val2017", pics)
    assert_clean_error(damo_opt("evaluate", MODEL, "--data", pics), "no labels")
    three = tmp_path / "three"
    (three / "val").mkdir(parents=True)
    data = json.loads((coco / "annotations" / "instances_val2017.json").read_text())
    data["categories"] = data["categories"][:3]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] <= 3]
    (three / "val.json").write_text(json.dumps(data))
    assert_clean_error(damo_opt("evaluate", MODEL, "--data", three), "6 classes", "has 3")


@pytest.mark.slow
def test_compare_two_formats(coco: Path, tmp_path: Path) -> None:
    """The checkpoint and its ONNX export: one table, same accuracy, both timed."""
    onnx = tmp_path / "model.onnx"
    proc = damo_opt("export", MODEL, "-o", onnx)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _json(damo_opt("compare", MODEL, onnx, "--data", coco, "--json"))
    assert isinstance(rows, list) and len(rows) == 2
    pt, ox = rows
    assert (pt["format"], ox["format"]) == ("torch", "onnx")
    assert pt["runtime"] == ox["runtime"] == "openvino" and pt["precision"] == "f32"
    assert pt["params"] == 600161 and pt["flops"] and pt["flops"] > 1e8
    assert pt["size_bytes"] > 1e6 and ox["size_bytes"] > 1e6
    assert abs(pt["mAP"] - ox["mAP"]) < 1e-3 and pt["mAP"] > 0.15
    assert pt["speedup"] == 1.0 and ox["latency_ms"] > 0
    # latency only, without data
    rows = _json(damo_opt("compare", MODEL, "--json"))
    assert isinstance(rows, list) and rows[0]["mAP"] is None and rows[0]["latency_ms"] > 0


@pytest.mark.slow
def test_quantize_reads_a_coco_folder_for_calib_and_val(coco: Path, tmp_path: Path) -> None:
    """``--calib DATA --val DATA`` as ``--data`` everywhere: the train images calibrate, the
    labelled val split checks INT8 by mAP (a COCO layout and a dataset YAML alike)."""
    for name, data in (("layout", coco), ("yaml", coco / "data.yaml")):
        proc = damo_opt(
            "quantize", MODEL, "--adapter", "onnxruntime", "--calib", data, "--val", data,
            "-o", tmp_path / name, "--json",
        )  # fmt: skip
        rep = _json(proc)
        assert isinstance(rep, dict)
        (step,) = [s for s in rep["steps"] if s["step"] == "quantize"]
        cfg, ver = step["config"], step["verification"]
        assert cfg["calibration"] == {"images": str((coco / "images" / "train2017").resolve())}
        assert cfg["val"]["coco"].endswith("instances_val2017.json")
        assert step["metrics"]["quantization"]["calibration_samples"] == 6  # all of train
        assert ver["passed"] and ver["samples"] == 16  # every labelled val image
        assert 0.15 < ver["mAP_fp32"] < 0.9 and abs(ver["mAP_drop"]) < 0.05


def test_optimize_refuses_bad_requests(
    coco: Path, tmp_path: Path, cache_env: dict[str, str]
) -> None:
    pics = tmp_path / "pics"
    shutil.copytree(coco / "images" / "val2017", pics)
    assert_clean_error(
        damo_opt("optimize", MODEL, "--data", pics, "-o", tmp_path / "a", env=cache_env),
        "no labels",
        "--no-accuracy",
    )
    assert_clean_error(
        damo_opt("optimize", MODEL, "--data", coco, "--device", "NPU.9", "-o", tmp_path / "b"),
        "NPU.9",
        "not available",
    )
    space = tmp_path / "space.yaml"
    space.write_text("runtimes: []\n")
    assert_clean_error(
        damo_opt("optimize", MODEL, "--data", coco, "--space", space, "-o", tmp_path / "c"),
        "candidate space is empty",
    )
    space.write_text("quantizers: [tensorrt]\n")
    assert_clean_error(
        damo_opt("optimize", MODEL, "--data", coco, "--space", space, "-o", tmp_path / "d"),
        "unknown quantizer",
    )
    assert_clean_error(
        damo_opt("optimize", MODEL, "--data", coco, "--time-budget", "soon", "-o", tmp_path / "e"),
        "not a duration",
    )


def _run_until(args: list[str], env: dict[str, str], needle: str, timeout: float) -> str:
    """Start ``damo-opt ARGS``; SIGKILL it as soon as ``needle`` appears on stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "damo_plugins.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            seen.append(line)
            if needle in line:
                proc.send_signal(signal.SIGKILL)
                break
            if time.monotonic() > deadline:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    text = "".join(seen)
    assert needle in text, text[-3000:]
    return text


@pytest.mark.slow
def test_optimize_end_to_end_killed_resumed_reproduced(
    tmp_path: Path, cache_env: dict[str, str]
) -> None:
    out = tmp_path / "opt"
    space = tmp_path / "space.yaml"
    space.write_text(
        "quantizers: [nncf]\nruntimes: [openvino-f32, openvino-bf16]\n"
        "calibration: 16\ncontrol: 12\nheld_out: 12\nrounds: 2\nslot_seconds: 0.1\n"
    )
    args = ["optimize", MODEL, "--data", "synthetic:24,24", "--space", str(space), "-o", str(out)]
    first = _run_until(args, cache_env, "[1/", timeout=900)
    assert "fused" in first and "quantize" in first
    entries = {p.parent.name: p.stat().st_mtime_ns for p in (out / "cache").glob("*/entry.json")}
    assert entries, "the killed run left no finished cache entry"
    # without --resume an earlier run's folder is refused, naming --resume
    assert_clean_error(damo_opt(*args, env=cache_env), "earlier run", "--resume")

    proc = damo_opt(*args, "--resume", env=cache_env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[1/" in proc.stderr and "(cached)" in proc.stderr.split("[1/")[1].splitlines()[0]
    for name, stamp in entries.items():  # nothing finished was recomputed
        assert (out / "cache" / name / "entry.json").stat().st_mtime_ns == stamp
    report = json.loads((out / "optimize.json").read_text())
    n_rows = len(report["rows"])
    assert report["cache"]["computed"] == n_rows - 1  # only the candidates after the first
    assert report["cache"]["cached"] >= len(entries)

    names = [r["name"] for r in report["rows"]]
    assert "original · openvino f32" in names and "fused · openvino f32" in names
    assert any("INT8 (nncf" in n for n in names)
    from damo_plugins.optimize.measure import precision_supported

    if precision_supported("CPU", "bf16"):
        assert any(r["precision"] == "bf16" for r in report["rows"])
    else:
        assert any("openvino-bf16" in s for s in report["skipped"])
    for r in report["rows"]:
        assert r["latency_ms"] > 0 and r["size_bytes"] > 0 and 0 <= r["mAP"] <= 1
    assert report["split"] == {
        "calibration": 16,
        "calibration_from": "train split of synthetic:24,24",
        "control": 12,
        "held_out": 12,
    }
    best = report["best"]
    assert best is not None
    # the best is within the budget on the control split, and the fastest such (3 % ties)
    ref = next(r for r in report["rows"] if r["name"] == "original · openvino f32")
    assert ref["control_mAP"] - best["control_mAP"] <= 0.01 + 1e-9
    ok = [r for r in report["rows"] if ref["control_mAP"] - r["control_mAP"] <= 0.01 + 1e-9]
    assert best["latency_ms"] <= 1.03 * min(r["latency_ms"] for r in ok)
    md = (out / "optimize.md").read_text()
    assert "held-out" in md and best["name"] in md and (out / "optimize.png").stat().st_size > 0

    # a second resume with nothing new: every candidate from the cache
    again = damo_opt(*args, "--resume", "--json", env=cache_env, timeout=600)
    rep2 = json.loads(_json_text(again))
    assert rep2["cache"]["computed"] == 0 and rep2["best"]["name"] == best["name"]

    # best/recipe.yaml reproduces the best model
    recipe = out / "best" / "recipe.yaml"
    assert recipe.is_file()
    rerun = damo_opt("run", recipe, "-o", tmp_path / "again", env=cache_env, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    report_run = json.loads((tmp_path / "again" / "report.json").read_text())
    made = Path(report_run["steps"][-1]["artifact"])
    shipped = out / "best" / f"model{made.suffix}"  # the same format as the best's files
    assert shipped.is_file(), sorted(p.name for p in (out / "best").iterdir())
    _assert_same_outputs(made, shipped, out / "data" / "calib")


def _json_text(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _assert_same_outputs(a: Path, b: Path, images: Path) -> None:
    """Two models give the same outputs on real images (rel. error < 1e-4 of the scale)."""
    from damo_plugins.core.artifact import load_model
    from damo_plugins.data.calibration import read_images

    ma, mb = load_model(str(a)), load_model(str(b))
    feeds = read_images(images, input_shape=ma.input_shape)
    for i in range(3):
        for x, y in zip(ma.run([feeds[i]]), mb.run([feeds[i]])):
            scale = max(float(np.abs(y).max()), 1e-6)
            assert float(np.abs(np.asarray(x) - np.asarray(y)).max()) / scale < 1e-4
