"""``damo-opt`` as a user runs it: exit codes, one-line errors, JSON shapes."""

from __future__ import annotations

import json
import os
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
    torch_flops = info["flops"]
    assert info["outputs"][1]["shape"] == [1, 8, 32, 32]
    out = tmp_path / "m.onnx"
    assert damo_opt("export", "tiny-cnn", "-o", str(out)).returncode == 0
    info = json.loads(damo_opt("info", str(out), "--json").stdout)
    assert info["format"] == "onnx" and info["flops"] == torch_flops  # counted from the graph
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


@pytest.mark.slow
def test_hello_plugin_distribution(tmp_path: Path) -> None:
    """The documented example plugin, installed for real with pip: its pass in a recipe, its
    event listener, its model builder and its verb, as ``docs/plugins.md`` shows them."""
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
    hello = {
        "distribution": "damo-hello-plugin",
        "version": "0.1.0",
        "entry_point": "hello = damo_hello",
    }
    assert {"name": "hello", "kind": "pass", **hello} in rows
    assert {"name": "hello-net", "kind": "model", **hello} in rows
    # loading the plugin is cheap: torch is imported only by the functions that need it
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, damo_hello; print(sorted(sys.modules))"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert probe.returncode == 0, probe.stderr
    assert "'torch'" not in probe.stdout and "'damo_hello'" in probe.stdout

    # the pass in a recipe, with the listener writing one JSON line per finished step
    events = tmp_path / "events.jsonl"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-cnn\nsteps:\n  - hello: {scale: 2.0}\n  - export\n")
    proc = damo_opt(
        "run",
        str(recipe),
        "-o",
        str(tmp_path / "out"),
        env={**env, "DAMO_HELLO_EVENTS": str(events)},
    )
    assert proc.returncode == 0, proc.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [s["step"] for s in rep["steps"]] == ["input", "hello", "export"]
    assert rep["steps"][1]["verification"]["passed"] and rep["steps"][1]["metrics"] == {
        "scale": 2.0
    }
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert [(e["step"], e["format"], e["passed"]) for e in lines] == [
        ("hello", "torch", True),
        ("export", "onnx", True),
    ]
    onnx_file = Path(lines[1]["artifact"])
    assert onnx_file.is_file() and onnx_file.suffix == ".onnx"

    # the model builder: keyword arguments, default_input_shape, a clean error for bad ones
    info = json.loads(
        damo_opt("info", "hello-net", "--json", "--model-arg", "channels=2", env=env).stdout
    )
    assert info["inputs"][0]["shape"] == [1, 3, 32, 32]
    assert info["params"] == 3 * 2 * 9 + 2 * 2 + 2 * 3 + 3  # conv, BN, linear weight + bias
    assert info["outputs"] == [{"name": "logits", "shape": [1, 3], "dtype": "float32"}]
    assert_clean_error(
        damo_opt("info", "hello-net", "--model-arg", "channels=0", env=env),
        "channels must be a positive integer",
    )

    # the verb: the pass through the step runner, verified; a format it cannot take
    proc = damo_opt(
        "hello", "hello-net", "--model-arg", "num_classes=5", "--scale", "3", "--json", env=env
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["step"] == "hello" and out["config"] == {"scale": 3.0}
    assert out["metrics"] == {"scale": 3.0}
    assert out["verification"]["passed"] and out["verification"]["max_rel"] <= 1e-6
    assert "hello: outputs x3.0" in proc.stderr
    assert_clean_error(damo_opt("hello", str(onnx_file), env=env), "cannot take a onnx model")

    # the adapter plugin `eager` (damo_hello/eager.py): benchmark options declared as a schema
    assert {
        "name": "eager",
        "kind": "adapter",
        "distribution": "damo-hello-plugin",
        "version": "0.1.0",
        "entry_point": "eager = damo_hello.eager",
    } in rows
    bench = tmp_path / "bench.yaml"
    bench.write_text(
        "model: tiny-cnn\nsteps:\n"
        "  - benchmark: {adapter: eager, iterations: 3, warmup: 0, threads: 1}\n"
        "  - benchmark: {adapter: eager, iterations: 3, warmup: 0, threads: 3}\n"
    )
    proc = damo_opt("run", str(bench), "-o", str(tmp_path / "bench"), env=env)
    assert proc.returncode == 0, proc.stderr
    steps = json.loads((tmp_path / "bench" / "report.json").read_text())["steps"][1:]
    stats = [s["metrics"]["benchmark"] for s in steps]
    # the option reached torch: each step ran with the threads it asked for
    assert [(s["adapter"], s["count"], s["threads"]) for s in stats] == [
        ("eager", 3, 1),
        ("eager", 3, 3),
    ]
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model: tiny-cnn\nsteps:\n  - benchmark: {adapter: eager, precision: f32}\n")
    assert_clean_error(
        damo_opt("run", str(wrong), "--dry-run", env=env),
        f"{wrong}:3: steps[0].benchmark.precision: 'precision' is an option of openvino; "
        "eager accepts: threads",
    )


def test_debug_is_accepted_after_the_verb_and_shows_the_traceback(tmp_path) -> None:
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    proc = damo_opt("info", str(bad), "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    assert "unrecognized arguments" not in proc.stderr


def test_a_closed_pipe_is_not_an_error() -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        f"{sys.executable} -m damo_plugins.cli plugins --json | head -c 10",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.startswith("[\n  {"), proc.stdout
    assert "Broken pipe" not in proc.stderr and "error" not in proc.stderr, proc.stderr
