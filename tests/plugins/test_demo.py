"""The main job: ``damo-opt demo`` end to end on the embedded trained model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from damo_plugins.core.artifact import load_model
from damo_plugins.core.manager import get_manager
from damo_plugins.core.recipe import load_recipe
from damo_plugins.data.evaluate import dataset_for, evaluate_artifact
from damo_plugins.demo import (
    EMBEDDED,
    PRUNED,
    RECOVERY,
    RECOVERY_DATA,
    ROWS,
    demo_recipes,
    embedded_checkpoint,
    sha256,
    shipped_pruned,
    summarize,
)
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


def test_shipped_pruned_checkpoint_is_what_demo_full_makes() -> None:
    """The pruned rows' checkpoint: safe to load, pruned from the embedded model (byte for
    byte), by exactly the recipe ``damo-opt demo --full`` runs, with the FLOPs it claims."""
    path, original = embedded_checkpoint(PRUNED), embedded_checkpoint()
    assert path is not None and original is not None, f"damo_plugins/assets/{PRUNED} is missing"
    assert path.stat().st_size < 10_000_000
    torch.load(path, weights_only=True)
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["parent_sha256"] == sha256(original)
    assert shipped_pruned(original) == (path, info)
    assert info["command"] == "damo-opt demo --full"
    assert info["recipe"] == RECOVERY and info["data"] == RECOVERY_DATA
    full = demo_recipes(str(original), "DATA", prune=RECOVERY)["pruned"]
    assert full["steps"][0] == {"prune": {**RECOVERY, "data": "DATA"}}
    load_recipe(full, get_manager(), source="<demo --full>")  # the options validate
    pruned, unpruned = load_model(path), load_model(original)
    removed = 1 - pruned.flops() / unpruned.flops()
    assert removed == pytest.approx(info["prune"]["flops_removed"], abs=1e-3)
    assert abs(removed - RECOVERY["flops"]) <= RECOVERY["flops_tolerance"]
    # every pruned conv keeps a multiple of 8 output channels (round_to), or its original count
    convs = dict(unpruned.model.named_modules())
    for name, m in pruned.model.named_modules():
        if isinstance(m, torch.nn.Conv2d) and m.out_channels != convs[name].out_channels:
            assert m.out_channels % RECOVERY["round_to"] == 0, (name, m.out_channels)
    cfg = EvaluateConfig(data="synthetic", images=40)
    metrics = evaluate_artifact(pruned, dataset_for(cfg, pruned.input_shape[2]), cfg)
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
    assert proc.stderr.count("[4/4] quantize done") == 2  # progress of both chains is shown
    # both chains ran through the pipeline, every step verified
    for chain, steps in (
        ("int8", ["input", "reparam", "export", "convert", "quantize"]),
        ("pruned", ["input", "reparam", "export", "convert", "quantize"]),  # shipped, recovered
    ):
        sub = json.loads((out / chain / "report.json").read_text())
        assert sub["status"] == "ok"
        assert [s["step"] for s in sub["steps"]] == steps
        for s in sub["steps"]:
            if s["verification"] is not None:
                assert s["verification"]["passed"], s
        quantize = sub["steps"][-1]["config"]
        # calibrated on the demo data's train split, never on the val split it is measured on
        assert Path(quantize["calibration"]["images"]).name == "train", quantize
        assert quantize["fast_bias_correction"] is True  # --quick: NNCF's fast one
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
    assert pruned["flops"] < 0.75 * fused["flops"]  # the shipped model: a quarter removed
    assert pruned["mAP"] > MAP_FLOOR  # recovered, on images no decision saw (seed 1)
    assert pruned_int8["size_bytes"] < int8["size_bytes"]
    md = (out / "report.md").read_text()
    assert "OpenVINO CPU at f32" in md and "INT8 vs fused FP32:" in md
    for name in ROWS:
        assert f"| {name} |" in md
    assert "report.png" in md and (out / "report.png").stat().st_size > 1000
    assert f"Pruned rows: the shipped `{PRUNED}`, made by `damo-opt demo --full`" in md
    # the machine the latencies were measured on, with its load at the time
    assert rep["machine"]["cpus"] >= 1 and "load_average" in rep["machine"]
    assert "Machine: " in md and "Load average" in md


def test_demo_prunes_another_original_itself() -> None:
    """A checkpoint the shipped pruned model was not made from gets its own prune step (a
    smoke recovery of the same recipe), never the shipped rows."""
    nano = embedded_checkpoint("damo-yolo-nano-synth.pt")
    assert nano is not None
    assert shipped_pruned(nano) is None
    steps = demo_recipes(str(nano), "DATA", quick=True)["pruned"]["steps"]
    prune = steps[0]["prune"]
    assert prune == {
        **RECOVERY,
        "flops_tolerance": 0.03,
        "finetune_epochs": 1,
        "recovery_iters": 1,
        "eval_limit": 50,
        "candidates": 1,
        "data": "DATA",
    }
    assert steps[1:] == demo_recipes(str(nano), "DATA", quick=True)["int8"]["steps"]
    # the user's demo quantizes with NNCF's exact bias correction, calibrated on the train split
    (quantize,) = [st["quantize"] for st in demo_recipes(str(nano), "DATA")["int8"]["steps"][-1:]]
    assert quantize["fast_bias_correction"] is False
    assert quantize["calibration"] == {"images": str(Path("DATA") / "train"), "size": 64}


def test_demo_quick_and_full_exclude_each_other(tmp_path: Path) -> None:
    proc = damo_opt("demo", "--quick", "--full", "-o", str(tmp_path / "d"))
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "d").exists()
