"""A model is called INT8 only if its graph holds quantize operations (counted, not trusted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from damo_plugins.core.errors import DamoError
from damo_plugins.core.manager import PluginManager
from damo_plugins.core.pipeline import run


def _recipe(adapter: str, **extra) -> dict:
    step = {"adapter": adapter, "calibration": {"generated": 8}, "subset_size": 8, **extra}
    return {"model": "tiny-cnn", "steps": [{"quantize": step}]}


@pytest.mark.parametrize("adapter", ["nncf", "onnxruntime"])
def test_int8_result_is_counted_and_labelled(tmp_path: Path, adapter: str) -> None:
    res = run(_recipe(adapter), output=tmp_path / "o", manager=PluginManager(), log=lambda m: None)
    q = res.report["steps"][1]["metrics"]["quantization"]
    assert q["quantized_ops"] > 0 and q["quantizable_ops"] > 0
    assert res.report["steps"][1]["precision"] == "int8"
    assert "| quantize |" in (tmp_path / "o" / "report.md").read_text()
    assert "INT8 vs FP32" in res.report["steps"][1]["verification"]["message"]


def test_a_result_with_nothing_quantized_fails_unless_accepted(tmp_path: Path) -> None:
    """NNCF told to ignore every convolution and matmul returns an FP32 graph: the step fails
    with the count; accepted explicitly, the report calls it fp32, never int8."""
    everything = {"types": ["Convolution", "MatMul", "Add", "ReduceMean"]}
    with pytest.raises(DamoError, match=r"left no operation quantized .*0 quantized"):
        run(
            _recipe("nncf", ignored_scope=everything, keep_head_fp=False),
            output=tmp_path / "a",
            manager=PluginManager(),
            log=lambda m: None,
        )
    res = run(
        _recipe("nncf", ignored_scope=everything, keep_head_fp=False, accept_fp_result=True),
        output=tmp_path / "b",
        manager=PluginManager(),
        log=lambda m: None,
    )
    step = res.report["steps"][1]
    assert step["precision"] == "fp32" and step["metrics"]["quantization"]["quantized_ops"] == 0
    assert "INT8" not in step["verification"]["message"]
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    assert rep["steps"][1]["precision"] == "fp32"


def test_training_time_model_is_fused_before_quantizing(tmp_path: Path) -> None:
    recipe = {
        "model": "damo-yolo-t",
        "model_args": {"width": 0.25},
        "input_shape": [1, 3, 64, 64],
        "steps": [
            {
                "quantize": {
                    "adapter": "nncf",
                    "calibration": {"generated": 4},
                    "subset_size": 4,
                    "holdout": 2,
                    "min_cosine": 0.0,
                    "min_agreement": 0.0,
                }
            }
        ],
    }
    res = run(recipe, output=tmp_path / "f", manager=PluginManager(), log=lambda m: None)
    fused = res.report["steps"][1]["metrics"]["fused_before_quantize"]
    assert fused["repconv_deployed"] > 0 and fused["multi_branch_remaining"] == 0
    recipe["steps"][0]["quantize"]["fuse"] = False
    res2 = run(recipe, output=tmp_path / "u", manager=PluginManager(), log=lambda m: None)
    assert "fused_before_quantize" not in res2.report["steps"][1]["metrics"]
    # the unfused graph has more convolutions to quantize than the deployed one
    q_fused = res.report["steps"][1]["metrics"]["quantization"]["quantizable_ops"]
    q_unfused = res2.report["steps"][1]["metrics"]["quantization"]["quantizable_ops"]
    assert q_unfused > q_fused
