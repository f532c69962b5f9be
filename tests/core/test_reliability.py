"""Nothing lost: interrupted runs, full disks, unwritable outputs; fuzzed parsers and loaders."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from damo_plugins.core.artifact import load_model
from damo_plugins.core.errors import DamoError
from damo_plugins.core.manager import get_manager
from damo_plugins.core.recipe import load_recipe, parse_text
from damo_plugins.models.structure import parse_structure
from tests.conftest import assert_clean_error, damo_opt


def test_killed_run_leaves_earlier_outputs_valid(tmp_path: Path, sleepy: Path) -> None:
    recipe = sleepy
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "damo_plugins.cli", "run", str(recipe), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ),
    )
    try:
        deadline = time.time() + 240
        for line in proc.stdout:  # type: ignore[union-attr]
            if "SLEEPY-STARTED" in line or time.time() > deadline:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    finals = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert finals == ["01-export", "report.json", "report.md"], finals
    assert load_model(out / "01-export" / "model.onnx").format == "onnx"
    rep = json.loads((out / "report.json").read_text())
    assert rep["status"] == "running" and [s["step"] for s in rep["steps"]] == ["input", "export"]


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_disk_full_during_write_is_clear_and_keeps_old_file(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous result")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "damo_plugins.cli", "export", "tiny-cnn", "-o", str(out), "--force"],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=_limit_file_size(2048),
        timeout=300,
    )
    assert_clean_error(proc, "no space left", str(out))
    assert out.read_bytes() == b"previous result"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _run_limited(args: list[str], cwd: Path, limit: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "damo_plugins.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"),
        preexec_fn=_limit_file_size(limit),
        timeout=300,
    )


def test_disk_full_in_native_writers_is_clear(tmp_path: Path) -> None:
    """torch.save and OpenVINO's save_model report a full disk in their own words
    ("unexpected pos", "basic_ios::clear"); both become the same clear line, naming the
    final file rather than the temporary folder it was being written in."""
    # torch checkpoint (the export verb's reparam step writes one first)
    proc = _run_limited(
        ["export", "tiny-cnn", "-o", "m.xml", "--format", "openvino"], tmp_path, 3000
    )
    assert_clean_error(proc, "no space left", "model.pt")
    # OpenVINO IR from an ONNX file, through a recipe
    assert damo_opt("export", "tiny-cnn", "-o", str(tmp_path / "m.onnx")).returncode == 0
    (tmp_path / "r.yaml").write_text("model: m.onnx\nsteps:\n  - convert: {to: openvino}\n")
    proc = _run_limited(["run", "r.yaml", "-o", "out"], tmp_path, 3000)
    assert_clean_error(proc, "no space left", str(Path("out") / "01-convert" / "model.xml"))
    assert not (tmp_path / "out" / "01-convert").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_unwritable_output(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_clean_error(
        damo_opt("export", "tiny-cnn", "-o", str(blocker / "m.onnx")), "cannot write"
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-cnn\nsteps: [export]\n")
    assert_clean_error(damo_opt("run", str(recipe), "-o", str(blocker / "out")), "cannot")


# ------------------------------------------------------------------- fuzzing
FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(st.text(max_size=300))
def test_fuzz_recipe_text(text: str) -> None:
    with contextlib.suppress(DamoError):
        data, _ = parse_text(text, "fuzz.yaml")
        if isinstance(data, dict):
            load_recipe(data, get_manager())


recipe_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 30) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["model", "steps", "input_shape", "seed", "output", "x"]), recipe_values
    )
)
def test_fuzz_recipe_structure(data: dict) -> None:
    with contextlib.suppress(DamoError):
        load_recipe(data, get_manager())


@FUZZ
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_fuzz_structure_text(text) -> None:
    with contextlib.suppress(DamoError):
        parse_structure(text)


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory) -> dict[str, bytes]:
    from damo_plugins.lib.onnx_export import export_onnx

    folder = tmp_path_factory.mktemp("valid")
    art = load_model("tiny-cnn")
    pt = art.save(folder)
    return {".pt": pt.read_bytes(), ".onnx": export_onnx(art).SerializeToString()}


@FUZZ
@given(st.sampled_from([".pt", ".onnx"]), st.floats(0, 1), st.binary(max_size=64))
def test_fuzz_truncated_and_random_files(
    valid_files, tmp_path_factory, suffix: str, frac: float, junk: bytes
) -> None:
    data = valid_files[suffix]
    cut = data[: int(len(data) * frac)] + junk
    path = tmp_path_factory.mktemp("fuzz") / f"m{suffix}"
    path.write_bytes(cut)
    with contextlib.suppress(DamoError):
        load_model(path)
