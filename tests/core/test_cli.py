"""``damo-opt`` as a user runs it: exit codes, one-line errors, JSON shapes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_clean_error, damo_opt


def test_console_script_installed() -> None:
    proc = subprocess.run(["damo-opt", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("damo-opt ")


def test_plugins_json_shape() -> None:
    proc = damo_opt("plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert all(set(r) == {"name", "kind", "distribution", "version", "entry_point"} for r in rows)
    kinds = {(r["name"], r["kind"], r["distribution"]) for r in rows}
    assert ("export", "pass", "damo-plugins") in kinds
    assert ("openvino", "adapter", "damo-plugins-openvino") in kinds
    assert ("nncf", "adapter", "damo-plugins-nncf") in kinds
    assert ("inc", "adapter", "damo-plugins-inc") in kinds
    assert ("onnxruntime", "adapter", "damo-plugins-onnxruntime") in kinds
    table = damo_opt("plugins")
    assert table.returncode == 0 and "damo-plugins-openvino" in table.stdout


def test_info_json_shape(tmp_path: Path) -> None:
    proc = damo_opt("info", "tiny-cnn", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert set(info) == {"format", "params", "flops", "inputs", "outputs"}
    assert info["format"] == "torch" and info["params"] == 1586 and info["flops"] > 0
    assert info["outputs"][1]["shape"] == [1, 8, 32, 32]
    out = tmp_path / "m.onnx"
    assert damo_opt("export", "tiny-cnn", "-o", str(out)).returncode == 0
    info = json.loads(damo_opt("info", str(out), "--json").stdout)
    assert info["format"] == "onnx" and info["flops"] is None
    assert info["inputs"] == [{"name": "images", "shape": [1, 3, 64, 64], "dtype": "float32"}]


def test_export_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    assert damo_opt("export", "tiny-cnn", "-o", str(out)).returncode == 0
    before = out.read_bytes()
    assert_clean_error(damo_opt("export", "tiny-cnn", "-o", str(out)), "already exists", "--force")
    assert out.read_bytes() == before
    assert (
        damo_opt("export", "tiny-cnn", "-o", str(out), "--force", "--opset", "18").returncode == 0
    )


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["info", "tiny-cn"], ["unknown model 'tiny-cn'", "did you mean 'tiny-cnn'"]),
        (["info", "missing.onnx"], ["not found", "missing.onnx"]),
        (["export", "tiny-cnn", "--model-arg", "nonsense"], ["KEY=VALUE"]),
        (["export", "tiny-cnn", "--model-arg", "depth=3"], ["does not accept"]),
        (["run", "nope.yaml"], ["recipe file not found"]),
    ],
)
def test_clean_errors(args: list[str], needles: list[str], tmp_path: Path) -> None:
    assert_clean_error(damo_opt(*args, cwd=tmp_path), *needles)


def test_corrupt_onnx_and_debug_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all" * 10)
    assert_clean_error(damo_opt("info", str(bad)), "not a valid ONNX model")
    debug = damo_opt("--debug", "info", str(bad))
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_run_dry_run_and_run(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-cnn\nsteps:\n  - export: {opset: 17}\n  - convert\n")
    dry = damo_opt("run", str(recipe), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "export" in dry.stdout and "-> openvino" in dry.stdout
    assert not (tmp_path / "runs").exists()
    proc = damo_opt("run", str(recipe), "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "[2/2] convert" in proc.stderr and (tmp_path / "out" / "report.md").is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny-cnn\nsteps:\n  - exprot\n")
    assert_clean_error(
        damo_opt("run", str(bad), "--dry-run"), "bad.yaml:3", "did you mean 'export'"
    )


def test_devices() -> None:
    rows = json.loads(damo_opt("devices", "--json").stdout)
    ov = next(r for r in rows if r["adapter"] == "openvino")
    assert "CPU" in ov["devices"] and ov["version"]


def test_hello_plugin_distribution(tmp_path: Path) -> None:
    """The documented example plugin, installed for real with pip, used in a recipe."""
    target = tmp_path / "site"
    pip = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "--target",
            str(target),
            str(REPO / "docs" / "examples" / "hello_plugin"),
        ],
        capture_output=True,
        text=True,
    )
    assert pip.returncode == 0, pip.stderr
    assert list(target.glob("damo_hello_plugin-*.dist-info"))
    env = {"PYTHONPATH": str(target)}
    rows = json.loads(damo_opt("plugins", "--json", env=env).stdout)
    assert {
        "name": "hello",
        "kind": "pass",
        "distribution": "damo-hello-plugin",
        "version": "0.1.0",
        "entry_point": "hello = damo_hello",
    } in rows
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-cnn\nsteps:\n  - hello: {scale: 2.0}\n  - export\n")
    proc = damo_opt("run", str(recipe), "-o", str(tmp_path / "out"), env=env)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [s["step"] for s in rep["steps"]] == ["input", "hello", "export"]
    assert rep["steps"][1]["verification"]["passed"] and rep["steps"][1]["metrics"] == {
        "scale": 2.0
    }
