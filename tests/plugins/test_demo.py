"""The main job: ``damo-opt demo`` end to end on the embedded trained model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from damo_plugins.core.artifact import load_model
from damo_plugins.data.evaluate import dataset_for, evaluate_artifact
from damo_plugins.demo import embedded_checkpoint
from damo_plugins.plugins.evaluate import EvaluateConfig
from tests.conftest import damo_opt

#: mAP@[.5:.95] the shipped model must keep on the first 40 held-out synthetic val images
#: (it scores 0.41 on all 300; a broken or wrongly shipped checkpoint scores ~0)
MAP_FLOOR = 0.30


def test_embedded_checkpoint_is_safe_and_accurate() -> None:
    path = embedded_checkpoint()
    assert path is not None, "damo_plugins/assets/damo-yolo-nano-synth.pt is missing"
    assert path.stat().st_size < 5_000_000
    payload = torch.load(path, weights_only=True)  # no code needed to read it
    assert payload["arch"]["builder"] == "damo-yolo-t"
    art = load_model(path)
    cfg = EvaluateConfig(data="synthetic", images=40)
    metrics = evaluate_artifact(art, dataset_for(cfg, art.input_shape[2]), cfg)
    assert metrics["mAP"] > MAP_FLOOR, metrics


def test_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = damo_opt("demo", "--quick", "-o", str(out), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"report: {out / 'report.md'}" in proc.stdout
    assert "[9/9] evaluate" in proc.stderr  # progress is shown
    rep = json.loads((out / "report.json").read_text())
    assert rep["status"] == "ok"
    steps = rep["steps"]
    assert [s["step"] for s in steps] == [
        "input",
        "evaluate",
        "reparam",
        "export",
        "convert",
        "benchmark",
        "evaluate",
        "quantize",
        "benchmark",
        "evaluate",
    ]
    for s in steps:
        assert isinstance(s["params"], int) and s["params"] > 0, s
        assert isinstance(s["flops"], int) and s["flops"] > 0, s
        assert isinstance(s["size_bytes"], int) and s["size_bytes"] > 0, s
        if s["verification"] is not None:
            assert s["verification"]["passed"], s
    maps = [s["metrics"]["evaluation"]["mAP"] for s in steps if s["step"] == "evaluate"]
    lats = [s["metrics"]["benchmark"]["median_ms"] for s in steps if s["step"] == "benchmark"]
    assert len(maps) == 3 and all(isinstance(m, float) for m in maps)
    assert maps[0] > MAP_FLOOR and abs(maps[1] - maps[0]) < 0.01  # FP32 IR == PyTorch
    assert maps[2] > maps[0] - 0.05  # INT8 with the head kept in FP stays close
    assert len(lats) == 2 and all(v > 0 for v in lats)
    int8 = next(s for s in steps if s["step"] == "quantize")
    assert int8["size_bytes"] < 0.6 * steps[4]["size_bytes"]  # INT8 weights on disk
    md = (out / "report.md").read_text()
    assert "| 7 | quantize | openvino |" in md and "report.png" in md
    assert (out / "report.png").stat().st_size > 1000
