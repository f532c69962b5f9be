"""The bad-input matrix: every case is one clear line, exit status 2, inputs untouched.

Each case runs through the command line (a subprocess, as a user runs it) and through the
Python API. ``python -m tests.core.test_bad_inputs`` prints the table of ``docs/reliability.md``
from the same cases, with the messages the tool really prints.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from damo_plugins.core.errors import DamoError


@dataclass
class Case:
    id: str
    what: str
    setup: Callable[[Path], list[str]]  # makes input files, returns damo-opt arguments
    expect: str  # fragment of the one-line message (case-insensitive)
    api: Callable[[Path], Any] | None = None  # the same through the Python API
    code: int = 2


def _tiny_checkpoint(tmp: Path) -> Path:
    from damo_plugins.core.artifact import load_model

    return load_model("tiny-cnn").save(tmp / "ckpt")


def _tiny_onnx(tmp: Path) -> Path:
    from damo_plugins.core.artifact import load_model
    from damo_plugins.lib.onnx_export import export_onnx

    p = tmp / "model.onnx"
    p.write_bytes(export_onnx(load_model("tiny-cnn")).SerializeToString())
    return p


def _write(tmp: Path, name: str, data: bytes | str) -> Path:
    p = tmp / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def _load(path_fn: Callable[[Path], Path], **kw: Any) -> Callable[[Path], Any]:
    def call(tmp: Path) -> Any:
        from damo_plugins.core.artifact import load_model

        art = load_model(path_fn(tmp), **kw)
        return art.summary()

    return call


def _pass_from_options(name: str, options: dict[str, Any]) -> Any:
    from damo_plugins.core.manager import get_manager
    from damo_plugins.core.verbs import pass_from_options

    return pass_from_options(get_manager().get_pass(name), options)


def _truncated(tmp: Path, maker: Callable[[Path], Path], name: str) -> Path:
    src = maker(tmp)
    data = src.read_bytes()
    return _write(tmp, name, data[: len(data) // 2])


def _evil_pt(tmp: Path) -> Path:
    import torch

    p = tmp / "evil.pt"
    torch.save({"model": _Evil()}, p)
    return p


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("code ran",))


def _mismatched_ir(tmp: Path) -> Path:
    from damo_plugins.core.artifact import load_model
    from damo_plugins.core.manager import get_manager

    ov = get_manager().get_adapter("openvino")
    a = ov.convert(load_model("tiny-cnn")).save(tmp / "a")
    b = ov.convert(load_model("tiny-cnn", model_args={"width": 16})).save(tmp / "b")
    a.with_suffix(".bin").write_bytes(b.with_suffix(".bin").read_bytes())
    return a


def _recipe(text: str) -> Callable[[Path], Path]:
    return lambda tmp: _write(tmp, "recipe.yaml", text)


def _run_recipe(text: str) -> Callable[[Path], Any]:
    def call(tmp: Path) -> Any:
        from damo_plugins.core.pipeline import run

        return run(_recipe(text)(tmp), output=tmp / "out", log=lambda m: None)

    return call


EVIL_STRUCTURE = "__import__('os').system('touch pwned')"
STEM_NO_OUT = "[{'class': 'ConvKXBNRELU', 'in': 3, 's': 1, 'k': 3}]"
STEM_NEG = "[{'class': 'ConvKXBNRELU', 'in': 3, 'out': -32, 's': 1, 'k': 3}]"


def _parse_structure(text: str) -> Any:
    from damo_plugins.models.structure import parse_structure

    return parse_structure(text)


def _mkdir(tmp: Path, name: str) -> Path:
    p = tmp / name
    p.mkdir()
    return p


def _bad_images(tmp: Path, name: str) -> Path:
    folder = _mkdir(tmp, name)
    (folder / "broken.jpg").write_bytes(b"this is not a JPEG")
    return folder


def _calibration(folder: Path) -> Any:
    from damo_plugins.data.calibration import resolve_calibration

    return list(resolve_calibration(str(folder), input_shape=[1, 3, 64, 64]))


def _adapter(name: str) -> Any:
    from damo_plugins.core.manager import get_manager

    return get_manager().get_adapter(name)


CASES = [
    Case(
        "missing-file",
        "model file does not exist",
        lambda t: ["info", str(t / "missing.onnx")],
        "not found",
        _load(lambda t: t / "missing.onnx"),
    ),
    Case(
        "directory",
        "a directory instead of a file",
        lambda t: ["info", str((t / "d.onnx").mkdir() or t / "d.onnx")],
        "is a directory",
        _load(lambda t: (t / "d2.onnx").mkdir() or t / "d2.onnx"),
    ),
    Case(
        "empty-file",
        "an empty model file",
        lambda t: ["info", str(_write(t, "e.onnx", b""))],
        "is empty",
        _load(lambda t: _write(t, "e2.onnx", b"")),
    ),
    Case(
        "corrupt-onnx",
        "a truncated .onnx",
        lambda t: ["info", str(_truncated(t, _tiny_onnx, "cut.onnx"))],
        "not a valid ONNX model",
        _load(lambda t: _truncated(t, _tiny_onnx, "cut2.onnx")),
    ),
    Case(
        "xml-bin-mismatch",
        "OpenVINO .xml with another model's .bin",
        lambda t: ["info", str(_mismatched_ir(t))],
        "not a readable OpenVINO IR",
        _load(lambda t: _mismatched_ir(t / "api")),
    ),
    Case(
        "corrupt-pt",
        "a truncated .pt checkpoint",
        lambda t: ["info", str(_truncated(t, _tiny_checkpoint, "cut.pt"))],
        "not a readable PyTorch checkpoint",
        _load(lambda t: _truncated(t, _tiny_checkpoint, "cut2.pt")),
    ),
    Case(
        "pt-needs-code",
        "a .pt whose unpickling would run code",
        lambda t: ["info", str(_evil_pt(t))],
        "refused to load",
        _load(_evil_pt),
    ),
    Case(
        "wrong-shape",
        "input shape the model cannot take (channels)",
        lambda t: ["info", "tiny-cnn", "--input-shape", "1,4,64,64"],
        "cannot run on input [1, 4, 64, 64]",
        _load(lambda t: "tiny-cnn", input_shape=[1, 4, 64, 64]),
    ),
    Case(
        "wrong-rank",
        "input of the wrong rank",
        lambda t: ["export", "tiny-cnn", "--input-shape", "3,64,64", "-o", str(t / "m.onnx")],
        "expected 4D input",
        _load(lambda t: "tiny-cnn", input_shape=[3, 64, 64]),
    ),
    Case(
        "verb-option-out-of-range",
        "a verb option the pass refuses",
        lambda t: ["export", "tiny-cnn", "--tolerance", "-1", "-o", str(t / "m.onnx")],
        "--tolerance: input should be greater than 0",
        lambda t: _pass_from_options("export", {"tolerance": -1}),
    ),
    Case(
        "recipe-unknown-key",
        "recipe with a misspelled key",
        lambda t: ["run", str(_recipe("model: tiny-cnn\nstepz: []\n")(t))],
        "did you mean 'steps'",
        _run_recipe("model: tiny-cnn\nstepz: []\n"),
    ),
    Case(
        "recipe-unknown-step",
        "recipe with an unknown step",
        lambda t: ["run", str(_recipe("model: tiny-cnn\nsteps: [exprot]\n")(t))],
        "unknown step 'exprot'",
        _run_recipe("model: tiny-cnn\nsteps: [exprot]\n"),
    ),
    Case(
        "recipe-wrong-type",
        "recipe option of the wrong type",
        lambda t: [
            "run",
            str(_recipe("model: tiny-cnn\nsteps:\n  - export: {opset: seventeen}\n")(t)),
        ],
        "valid integer",
        _run_recipe("model: tiny-cnn\nsteps:\n  - export: {opset: seventeen}\n"),
    ),
    Case(
        "recipe-yaml-syntax",
        "recipe that is not YAML",
        lambda t: ["run", str(_recipe("model: [tiny-cnn\n")(t))],
        "not valid YAML",
        _run_recipe("model: [tiny-cnn\n"),
    ),
    Case(
        "recipe-wrong-format",
        "a step that cannot take the previous step's format",
        lambda t: ["run", str(_recipe("model: tiny-cnn\nsteps: [export, export]\n")(t))],
        "cannot take a onnx model",
        _run_recipe("model: tiny-cnn\nsteps: [export, export]\n"),
    ),
    Case(
        "unknown-model",
        "a model name nobody registered",
        lambda t: ["info", "damo-yolo-xxl"],
        "unknown model 'damo-yolo-xxl'",
        _load(lambda t: "damo-yolo-xxl"),
    ),
    Case(
        "structure-not-literal",
        "NAS structure that is code, not a literal",
        lambda t: ["nas", "score", str(_write(t, "s.txt", EVIL_STRUCTURE))],
        "neither JSON nor a Python literal",
        lambda t: _parse_structure(EVIL_STRUCTURE),
    ),
    Case(
        "structure-missing-key",
        "NAS structure block without 'out'",
        lambda t: ["nas", "score", str(_write(t, "s.txt", STEM_NO_OUT))],
        "missing key(s) out",
        lambda t: _parse_structure(STEM_NO_OUT),
    ),
    Case(
        "structure-negative",
        "NAS structure with negative channels",
        lambda t: ["nas", "score", str(_write(t, "s.txt", STEM_NEG))],
        "'out' must be positive",
        lambda t: _parse_structure(STEM_NEG),
    ),
    Case(
        "calibration-empty",
        "calibration folder without images",
        lambda t: [
            "quantize",
            "tiny-cnn",
            "--adapter",
            "nncf",
            "--calib",
            str(_mkdir(t, "calib")),
            "-o",
            str(t / "q"),
        ],
        "holds no images",
        lambda t: _calibration(_mkdir(t, "calib2")),
    ),
    Case(
        "calibration-undecodable",
        "calibration image that does not decode",
        lambda t: [
            "quantize",
            "tiny-cnn",
            "--adapter",
            "nncf",
            "--calib",
            str(_bad_images(t, "calib")),
            "-o",
            str(t / "q"),
        ],
        "cannot decode calibration image",
        lambda t: _calibration(_bad_images(t, "calib2")),
    ),
    Case(
        "unknown-adapter",
        "an adapter nobody installed",
        lambda t: ["bench", "tiny-cnn", "--adapter", "tensorrt"],
        "unknown adapter 'tensorrt'",
        lambda t: _adapter("tensorrt"),
    ),
    Case(
        "unsupported-device",
        "a device this machine does not have",
        lambda t: ["bench", "tiny-cnn", "--adapter", "openvino", "--device", "NPU"],
        "'NPU' is not available",
        lambda t: _adapter("openvino").check_device("NPU"),
    ),
    Case(
        "unwritable-output",
        "output below a regular file",
        lambda t: ["export", "tiny-cnn", "-o", str(_write(t, "f", "x") / "m.onnx")],
        "cannot write",
        None,
    ),
]


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def run_cli(
    case: Case, tmp: Path
) -> tuple[subprocess.CompletedProcess[str], dict[str, str], dict[str, str]]:
    args = case.setup(tmp)
    before = _snapshot(tmp)
    proc = subprocess.run(
        [sys.executable, "-m", "damo_plugins.cli", *args],
        capture_output=True,
        text=True,
        cwd=tmp,
        timeout=300,
    )
    return proc, before, _snapshot(tmp)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli(case: Case, tmp_path: Path) -> None:
    from tests.conftest import assert_clean_error

    proc, before, after = run_cli(case, tmp_path)
    assert_clean_error(proc, case.expect, code=case.code)
    changed = {k for k in before if before[k] != after.get(k)}
    assert not changed, f"input files changed: {changed}"
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("case", [c for c in CASES if c.api], ids=[c.id for c in CASES if c.api])
def test_api(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(DamoError) as info:
        case.api(tmp_path)  # type: ignore[misc]
    assert case.expect.lower() in str(info.value).lower()
    assert "code ran" not in capsys.readouterr().out


def markdown_table() -> str:
    import tempfile

    rows = ["| case | input | message (stderr) | exit |", "|---|---|---|---|"]
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            proc, _, _ = run_cli(case, Path(tmp))
        line = next(
            (ln for ln in proc.stderr.splitlines() if ln.startswith("damo-opt: error:")),
            proc.stderr.strip(),
        )
        line = line.replace(tmp, "…").replace("|", "\\|")
        rows.append(f"| `{case.id}` | {case.what} | `{line}` | {proc.returncode} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table())
