"""`evaluate` needs data that fits the model: no silent default data set, no class mismatch."""

from __future__ import annotations

from pathlib import Path

import pytest

from damo_plugins.core.errors import DamoError
from damo_plugins.core.manager import PluginManager
from damo_plugins.core.pipeline import run
from damo_plugins.demo import embedded_checkpoint


def _run(tmp_path: Path, model: str, step: dict, **recipe) -> dict:
    rec = {"model": model, "steps": [{"evaluate": step}], **recipe}
    return run(rec, output=tmp_path / "o", manager=PluginManager(), log=lambda m: None).report


def test_evaluate_without_data_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DamoError, match="evaluate needs data"):
        _run(
            tmp_path,
            "damo-yolo-t",
            {"images": 2},
            input_shape=[1, 3, 64, 64],
            model_args={"width": 0.25, "num_classes": 6},
        )


def test_class_count_mismatch_names_both(tmp_path: Path) -> None:
    with pytest.raises(DamoError, match=r"predicts 3 classes but .* has 6 categories"):
        _run(
            tmp_path,
            "damo-yolo-t",
            {"data": "synthetic", "images": 2},
            input_shape=[1, 3, 64, 64],
            model_args={"width": 0.25, "num_classes": 3},
        )


def test_the_embedded_model_evaluates_on_its_own_data(tmp_path: Path) -> None:
    rep = _run(tmp_path, str(embedded_checkpoint("damo-yolo-nano-synth.pt")), {"images": 8})
    ev = rep["steps"][1]["metrics"]["evaluation"]
    assert ev["images"] == 8 and ev["mAP"] > 0.1
