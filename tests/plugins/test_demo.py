"""The main job: ``damo-opt demo`` end to end on the embedded trained model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from damo_plugins.core.artifact import load_model
from damo_plugins.data.evaluate import dataset_for, evaluate_artifact
from damo_plugins.demo import EMBEDDED, ROWS, embedded_checkpoint, summarize
from damo_plugins.plugins.evaluate import EvaluateConfig
from tests.conftest import damo_opt

#: mAP@[.5:.95] the shipped model must keep on the first 40 held-out synthetic val images
#: (its JSON states the score on all 300; a broken or wrongly shipped checkpoint scores ~0)
MAP_FLOOR = 0.30


def test_embedded_checkpoint_is_safe_and_accurate() -> None:
    path = embedded_checkpoint()
    assert path is not None, f"damo_plugins/assets/{EMBEDDED} is missing"
    assert path.stat().st_size < 10_000_000
    payload = torch.load(path, weights_only=True)  # no code needed to read it
    info = json.loads(path.with_suffix(".json").read_text())
    assert payload["arch"]["builder"] == info["builder"] == "damo-yolo-t"
    art = load_model(path)
    # the JSON describes this checkpoint, not an earlier one
    assert list(art.input_shape) == info["input_shape"]
    assert art.model.head.num_classes == info["kwargs"]["num_classes"] == len(info["classes"])
    assert {"epochs_done", "cpu_min", "converged"} <= set(info["train"])
    cfg = EvaluateConfig(data="synthetic", images=40)
    metrics = evaluate_artifact(art, dataset_for(cfg, art.input_shape[2]), cfg)
    assert metrics["mAP"] > MAP_FLOOR, metrics


def test_summary_claims_a_speed_up_only_when_every_round_shows_it() -> None:
    def row(name: str, rounds: list[float]) -> dict[str, object]:
        return {"name": name, "latency_rounds_ms": rounds}

    rows = [
        row("original", [10.0, 11.0, 10.0]),
        row("fused", [8.0, 9.0, 8.0]),
        row("INT8", [5.0, 9.5, 4.0]),  # lost the second round
        row("pruned", [6.0, 6.0, 6.0]),
        row("pruned + INT8", [4.0, 4.0, 4.0]),
    ]
    s = summarize(rows)
    assert not s["int8_vs_fused"]["faster_every_round"]
    assert s["int8_vs_fused"]["median"] == 1.6
    assert s["int8_vs_fused"]["min"] < 1 < s["int8_vs_fused"]["max"]
    assert s["pruned_int8_vs_original"]["faster_every_round"]


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = damo_opt("demo", "--quick", "-o", str(out), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"report: {out / 'report.md'}" in proc.stdout
    assert "[5/5] quantize" in proc.stderr  # progress of the pruned chain is shown
    # both chains ran through the pipeline, every step verified
    for chain, steps in (
        ("int8", ["input", "reparam", "export", "convert", "quantize"]),
        ("pruned", ["input", "prune", "reparam", "export", "convert", "quantize"]),
    ):
        sub = json.loads((out / chain / "report.json").read_text())
        assert sub["status"] == "ok"
        assert [s["step"] for s in sub["steps"]] == steps
        for s in sub["steps"]:
            if s["verification"] is not None:
                assert s["verification"]["passed"], s
    rep = json.loads((out / "report.json").read_text())
    assert rep["status"] == "ok"
    rows = {r["name"]: r for r in rep["rows"]}
    assert list(rows) == list(ROWS)
    for r in rows.values():
        assert isinstance(r["params"], int) and r["params"] > 0, r
        assert isinstance(r["flops"], int) and r["flops"] > 0, r
        assert isinstance(r["size_bytes"], int) and r["size_bytes"] > 0, r
        assert isinstance(r["mAP"], float), r
        assert r["runtime"] == "openvino" and r["precision"] == "f32", r
        assert len(r["latency_rounds_ms"]) == rep["rounds"] and r["latency_ms"] > 0, r
    orig, fused, int8 = rows["original"], rows["fused"], rows["INT8"]
    pruned, pruned_int8 = rows["pruned"], rows["pruned + INT8"]
    assert orig["mAP"] > MAP_FLOOR
    assert abs(fused["mAP"] - orig["mAP"]) < 0.01  # fusing changes no result
    assert int8["mAP"] > fused["mAP"] - 0.05  # INT8 with the decode kept in FP stays close
    assert int8["size_bytes"] < 0.6 * fused["size_bytes"]  # INT8 weights on disk
    assert fused["flops"] <= orig["flops"] and fused["params"] <= orig["params"]
    assert pruned["flops"] < 0.9 * fused["flops"]  # the prune pass removed real work
    assert pruned_int8["size_bytes"] < int8["size_bytes"]
    md = (out / "report.md").read_text()
    assert "OpenVINO CPU at f32" in md and "INT8 vs fused FP32:" in md
    for name in ROWS:
        assert f"| {name} |" in md
    assert "report.png" in md and (out / "report.png").stat().st_size > 1000
