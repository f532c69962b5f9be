"""`evaluate` needs data that fits the model: no silent default data set, no class mismatch."""

from __future__ import annotations

import os
import shutil
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


def test_a_killed_shard_workers_model_folder_is_removed_by_the_next() -> None:
    """A worker's model folder carries its pid; a worker that loads a model removes the
    folders of workers that no longer exist (SIGKILL runs no cleanup), and only those."""
    import subprocess
    import sys
    import tempfile

    from damo_plugins.data import sharded

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead = Path(tempfile.mkdtemp(prefix=f"{sharded._WORKER_PREFIX}{int(gone.stdout)}-"))
    mine = Path(tempfile.mkdtemp(prefix=f"{sharded._WORKER_PREFIX}{os.getpid()}-"))
    other = Path(tempfile.mkdtemp(prefix="damo-shard-model-wx-"))  # not a worker's: kept
    try:
        sharded._sweep_orphans()
        assert not dead.exists() and mine.is_dir() and other.is_dir()
    finally:
        for folder in (dead, mine, other):
            shutil.rmtree(folder, ignore_errors=True)
