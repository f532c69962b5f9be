"""The pipeline: steps in order, verified, saved atomically, inputs untouched, reports."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from damo_plugins.core.artifact import load_model
from damo_plugins.core.errors import DamoError, VerificationError
from damo_plugins.core.manager import PluginManager
from damo_plugins.core.pipeline import run
from tests.conftest import assert_clean_error, damo_opt

BROKEN_PASSES = """
import numpy as np
import onnx
from onnx import numpy_helper
from damo_plugins import Pass, hookimpl


class Perturb(Pass):
    '''Claims to preserve the model but changes a weight: verification must catch it.'''
    name = "perturb"
    accepts = ("onnx",)

    def run(self, artifact, ctx):
        proto = onnx.ModelProto()
        proto.CopyFrom(artifact.model)
        init = proto.graph.initializer[0]
        arr = numpy_helper.to_array(init).copy() + 1.0
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
        return artifact.derive(model=proto)


class Crash(Pass):
    name = "crash"
    accepts = ("onnx", "torch")

    def run(self, artifact, ctx):
        raise ZeroDivisionError("deep inside")


@hookimpl
def damo_passes():
    return [Perturb, Crash]
"""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hidden(folder: Path) -> list[Path]:
    """Hidden leftovers (temporary files), not the tool's manifest and lock."""
    from damo_plugins.core.output import BOOKKEEPING

    return [p for p in folder.rglob("*") if p.name.startswith(".") and p.name not in BOOKKEEPING]


@pytest.fixture
def broken(plugin_path) -> PluginManager:
    plugin_path(
        "broken-passes", {"broken_passes": BROKEN_PASSES}, {"broken-passes": "broken_passes"}
    )
    return PluginManager()


def test_run_export_convert(tmp_path: Path) -> None:
    out = tmp_path / "out"
    recipe = {"model": "tiny-cnn", "steps": [{"export": {"opset": 17}}, "convert"]}
    res = run(recipe, output=out, manager=PluginManager(), log=lambda m: None)
    assert res.artifact.format == "openvino"
    assert (out / "01-export" / "model.onnx").is_file()
    assert (out / "02-convert" / "model.xml").is_file() and (
        out / "02-convert" / "model.bin"
    ).is_file()
    rep = json.loads((out / "report.json").read_text())
    assert rep["status"] == "ok"
    assert [s["step"] for s in rep["steps"]] == ["input", "export", "convert"]
    for s in rep["steps"][1:]:
        assert s["verification"]["passed"] and s["verification"]["max_rel"] < 1e-4
    assert rep["steps"][0]["flops"] > 0 and rep["steps"][0]["params"] == 1586
    assert "| 1 | export | onnx |" in (out / "report.md").read_text()
    assert not _hidden(out)
    # the saved files are what the report says, and they load
    onnx_art = load_model(out / "01-export" / "model.onnx")
    feeds = onnx_art.example_inputs()
    ov_art = load_model(out / "02-convert" / "model.xml")
    np.testing.assert_allclose(ov_art.run(feeds)[0], onnx_art.run(feeds)[0], rtol=1e-4, atol=1e-5)


def test_input_model_file_is_never_modified(tmp_path: Path) -> None:
    src = tmp_path / "in"
    art = load_model("tiny-cnn")
    model_file = art.save(src)
    before, mtime = _sha(model_file), model_file.stat().st_mtime_ns
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: in/model.pt\nsteps:\n  - export\n")
    run(recipe, output=tmp_path / "out", manager=PluginManager(), log=lambda m: None)
    assert _sha(model_file) == before and model_file.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in src.iterdir()) == ["model.pt"]


def test_failed_verification_stops_and_keeps_earlier_outputs(tmp_path: Path, broken) -> None:
    out = tmp_path / "out"
    recipe = {"model": "tiny-cnn", "steps": ["export", "perturb", "convert"]}
    with pytest.raises(VerificationError, match="step 'perturb' failed verification"):
        run(recipe, output=out, manager=broken, log=lambda m: None)
    assert load_model(out / "01-export" / "model.onnx").format == "onnx"
    assert not (out / "02-perturb").exists() and not (out / "03-convert").exists()
    assert not _hidden(out)
    rep = json.loads((out / "report.json").read_text())
    assert rep["status"] == "failed" and "perturb" in rep["error"]
    assert rep["steps"][-1]["verification"]["passed"] is False


def test_crashing_step_is_a_clear_error(tmp_path: Path, broken) -> None:
    out = tmp_path / "out"
    with pytest.raises(DamoError, match=r"step 'crash' failed: ZeroDivisionError: deep inside"):
        run(
            {"model": "tiny-cnn", "steps": ["export", "crash"]},
            output=out,
            manager=broken,
            log=lambda m: None,
        )
    assert (out / "01-export" / "model.onnx").is_file()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-cnn\nsteps: [export, perturb]\n")
    proc = damo_opt("run", str(recipe), "-o", str(tmp_path / "cli"))
    assert_clean_error(proc, "perturb", "failed verification", code=3)
    assert (tmp_path / "cli" / "01-export" / "model.onnx").is_file()


def test_existing_output_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    recipe = {"model": "tiny-cnn", "steps": ["export", "convert"]}
    run(recipe, output=out, manager=PluginManager(), log=lambda m: None)
    first = _sha(out / "01-export" / "model.onnx")
    with pytest.raises(DamoError, match=r"already holds.*--force"):
        run(recipe, output=out, manager=PluginManager(), log=lambda m: None)
    assert _sha(out / "01-export" / "model.onnx") == first
    run(
        {"model": "tiny-cnn", "steps": ["export"]},
        output=out,
        force=True,
        manager=PluginManager(),
        log=lambda m: None,
    )
    assert not (out / "02-convert").exists()  # stale step folder of the old run removed
    assert (out / "01-export" / "model.onnx").is_file()


def test_events_reach_listeners(tmp_path: Path) -> None:
    from damo_plugins import hookimpl

    seen: list[str] = []

    class Tracker:
        @hookimpl
        def damo_pipeline_started(self, recipe, output):
            seen.append(f"start:{recipe.model}")

        @hookimpl
        def damo_step_finished(self, step, before, after, metrics):
            seen.append(
                f"{step}:{before.format}->{after.format}:{metrics['verification']['passed']}"
            )

        @hookimpl
        def damo_pipeline_finished(self, report):
            seen.append(f"end:{report['status']}")

    mgr = PluginManager()
    mgr.register(Tracker(), "tracker")
    run(
        {"model": "tiny-cnn", "steps": ["export"]},
        output=tmp_path / "o",
        manager=mgr,
        log=lambda m: None,
    )
    assert seen == ["start:tiny-cnn", "export:torch->onnx:True", "end:ok"]
