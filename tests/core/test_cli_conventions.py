"""Command-line conventions every ``damo-opt`` verb keeps (issue 19 item 6, issue 14 item 8).

``--json`` on every verb (one document on stdout, nothing else), defaults in ``--help``,
single-step verbs writing where ``-o`` says, recipe paths relative to the recipe file,
errors in the terms the user typed, a checkpoint whose builder is missing named as such,
``--debug`` anywhere and quiet broken pipes. The verb lists come from the parser itself, so
a verb added later without ``--json`` or with an unstated default fails here.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from damo_plugins.cli import build_parser
from damo_plugins.core.errors import DamoError, VerificationError
from damo_plugins.core.manager import get_manager
from damo_plugins.core.recipe import load_recipe
from damo_plugins.core.verbs import flag_error, shown_default
from damo_plugins.testing import installed
from tests.conftest import assert_clean_error, damo_opt


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy DAMO-style detector in ONNX, seeded: its INT8 check passes deterministically
    (a randomly initialized ``tiny-cnn`` sometimes lands just under the cosine bound)."""
    import torch

    from tests.adapters.adapter_toys import toy_onnx

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("toy") / "toy.onnx"
    path.write_bytes(toy_onnx(64).model.SerializeToString())
    return path


def quantize(toy: Path) -> list[str]:
    """Small, real quantization: ONNX Runtime on the toy detector, 4 generated samples."""
    return ["quantize", str(toy), "--adapter", "onnxruntime", "--calib", "generated:4"]


def _verbs(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple]:
    """(command words, parser) of every leaf verb: ``("nas", "score")``, ``("quantize",)``..."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, sub in subs[0].choices.items():
        yield from _verbs(sub, (*path, name))


VERBS = list(_verbs(build_parser()))


def test_the_verb_list_is_the_parser_s() -> None:
    """Guards the walk itself: built-in verbs and plugin verbs (and sub-verbs) are all in it."""
    names = {" ".join(words) for words, _ in VERBS}
    expected = {"plugins", "run", "info", "devices", "demo", "quantize", "fuse", "export"}
    expected |= {"train", "nas score", "nas search", "nas profile", "keypoints export"}
    assert expected <= names, expected - names


# ------------------------------------------------------------------------- 1. --json
@pytest.mark.parametrize("words", [w for w, _ in VERBS], ids=" ".join)
def test_every_verb_takes_json(words: tuple[str, ...]) -> None:
    parser = dict(VERBS)[words]
    flags = {s for a in parser._actions for s in a.option_strings}
    assert "--json" in flags, f"damo-opt {' '.join(words)} has no --json"


def _one_document(proc: subprocess.CompletedProcess[str]) -> object:
    """The process succeeded and its stdout is exactly one JSON document."""
    assert proc.returncode == 0, proc.stderr[-2000:]
    try:
        return json.loads(proc.stdout)  # fails on any other text before or after it
    except ValueError as exc:
        raise AssertionError(f"stdout is not one JSON document: {proc.stdout[:500]!r}") from exc


def test_json_run_and_dry_run(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-cnn\nsteps:\n  - export: {opset: 17}\noutput: out\n")
    plan = _one_document(damo_opt("run", recipe, "--dry-run", "--json"))
    assert plan["valid"] is True and plan["format"] == "torch"
    assert [(s["step"], s["format"], s["config"]["opset"]) for s in plan["steps"]] == [
        ("export", "onnx", 17)
    ]
    rep = _one_document(damo_opt("run", recipe, "--json", cwd=tmp_path))
    assert rep["status"] == "ok" and [s["step"] for s in rep["steps"]] == ["input", "export"]
    model = Path(rep["files"]["model"])
    assert model.is_file() and model.parent.name == "01-export"  # recipes keep one folder a step
    assert json.loads(Path(rep["files"]["report"]).read_text())["status"] == "ok"


def test_json_quantize_is_the_report_and_backends_stay_off_stdout(
    tmp_path: Path, toy: Path
) -> None:
    rep = _one_document(damo_opt(*quantize(toy), "--subset", "4", "-o", tmp_path / "q", "--json"))
    step = rep["steps"][-1]
    assert step["step"] == "quantize" and step["precision"] == "int8"
    assert step["verification"]["passed"] and step["verification"]["cosine_min"] >= 0.97
    assert Path(rep["files"]["model"]) == tmp_path / "q" / "model.onnx"


def test_json_fuse_and_export(tmp_path: Path) -> None:
    fused = _one_document(damo_opt("fuse", "tiny-cnn", "-o", tmp_path / "f", "--json"))
    assert fused["files"]["model"] == str(tmp_path / "f" / "model.pt")  # flat: -o as given
    assert (tmp_path / "f" / "model.pt").is_file() and (tmp_path / "f" / "report.json").is_file()
    first, last = fused["steps"][0], fused["steps"][-1]
    assert last["step"] == "reparam" and last["verification"]["passed"]
    assert last["params"] < first["params"]  # BN folded into the convolutions
    one = _one_document(damo_opt("fuse", "tiny-cnn", "-o", tmp_path / "one.pt", "--json"))
    assert one["files"]["model"] == str(tmp_path / "one.pt") and (tmp_path / "one.pt").is_file()
    exp = _one_document(damo_opt("export", "tiny-cnn", "-o", tmp_path / "m.onnx", "--json"))
    assert exp["files"] == [str(tmp_path / "m.onnx")] and (tmp_path / "m.onnx").is_file()


def test_json_nas_keypoints_and_listings(tmp_path: Path) -> None:
    score = _one_document(damo_opt("nas", "score", "t", "--json"))
    assert score["layers"] == 19
    table = tmp_path / "lat.json"
    prof = _one_document(
        damo_opt(
            "nas",
            "profile",
            "--backend",
            "torch",
            "--samples",
            "1",
            "--calibrate",
            "0",
            "--repeats",
            "1",
            "--resolution",
            "64",
            "-o",
            table,
            "--json",
        )
    )
    assert prof["table"] == str(table) and table.is_file() and prof["convolutions"] > 0
    kp = _one_document(
        damo_opt("keypoints", "export", "--postprocess-only", "-o", tmp_path / "k.onnx", "--json")
    )
    assert kp["output"] == str(tmp_path / "k.onnx") and kp["passed"] is True
    assert set(kp["verification"]) >= {"onnxruntime"}
    assert isinstance(_one_document(damo_opt("plugins", "--json")), list)


def test_json_error_is_one_line_on_stderr_and_nothing_on_stdout(tmp_path: Path, toy: Path) -> None:
    proc = damo_opt(*quantize(toy), "--subset", "0", "-o", tmp_path / "q", "--json")
    assert_clean_error(proc, "--subset")
    assert proc.stdout == ""
    assert not (tmp_path / "q").exists()  # refused before the output folder was taken


# ------------------------------------------------------------------ 2. defaults in --help
def _option_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    formatter._width = 10_000  # one line per option: no wrapping inside the default's text
    formatter.add_argument(action)
    return " ".join(formatter.format_help().split())


@pytest.mark.parametrize("words", [w for w, _ in VERBS], ids=" ".join)
def test_help_states_every_default(words: tuple[str, ...]) -> None:
    parser = dict(VERBS)[words]
    missing = []
    for action in parser._actions:
        if not shown_default(action):
            continue
        default = action.default
        value = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        text = _option_help(parser, action)
        if not re.search(r"default:?\s+" + re.escape(value), text, re.I):
            missing.append(f"{'/'.join(action.option_strings) or action.dest}={value}: {text}")
    assert not missing, f"damo-opt {' '.join(words)} --help hides defaults:\n" + "\n".join(missing)


def test_help_leaves_unset_options_alone() -> None:
    """No "(default: None)" / "(default: False)" noise, and the real --help shows defaults."""
    proc = damo_opt("quantize", "--help")
    assert proc.returncode == 0
    assert "(default: None)" not in proc.stdout and "(default: False)" not in proc.stdout
    assert "(default: 300)" in " ".join(proc.stdout.split())  # --subset


# -------------------------------------------------------------- 3. flat single-step output
def test_quantize_writes_to_o_as_given_and_owns_only_its_files(tmp_path: Path, toy: Path) -> None:
    out = tmp_path / "q"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = [*quantize(toy), "--subset", "4", "-o", out]
    assert_clean_error(damo_opt(*args), "files it did not write", "--force")
    proc = damo_opt(*args, "--force")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "model.onnx",
        "notes.txt",
        "report.json",
        "report.md",
        "report.png",
    ]
    assert not list(out.glob("0*-*"))  # no 01-quantize/ nesting
    rep = json.loads((out / "report.json").read_text())
    assert rep["steps"][-1]["artifact"] == str(out / "model.onnx")
    assert rep["steps"][-1]["size_bytes"] == (out / "model.onnx").stat().st_size
    manifest = json.loads((out / ".damo-outputs.json").read_text())
    assert "model.onnx" in manifest["entries"] and "notes.txt" not in manifest["entries"]
    # a second run replaces only the tool's own files
    first = (out / "model.onnx").stat().st_mtime_ns
    assert_clean_error(damo_opt(*args), "already holds")  # notes.txt is still there
    assert damo_opt(*args, "--force").returncode == 0
    assert (out / "model.onnx").stat().st_mtime_ns != first
    assert (out / "notes.txt").read_text() == "mine"


def test_flat_output_never_replaces_a_file_it_did_not_write(tmp_path: Path, toy: Path) -> None:
    out = tmp_path / "q"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"the user's own model")
    proc = damo_opt(*quantize(toy), "--subset", "4", "-o", out, "--force")
    assert_clean_error(proc, "model.onnx", "not written by this run")
    assert (out / "model.onnx").read_bytes() == b"the user's own model"
    assert not list(out.glob(".*.tmp"))  # the step's temporary folder is gone


def test_flat_output_needs_a_one_step_recipe(tmp_path: Path) -> None:
    from damo_plugins.core.pipeline import run

    recipe = {"model": "tiny-cnn", "steps": ["export", {"convert": {"to": "openvino"}}]}
    with pytest.raises(DamoError, match="this recipe has 2"):
        run(recipe, output=tmp_path / "o", flat=True, log=lambda _: None)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------- 4. recipe-relative paths
def test_recipe_paths_are_relative_to_the_recipe(tmp_path: Path, toy: Path) -> None:
    """Run from another folder: model, calibration data and output are found next to the
    recipe; keywords stay as written."""
    here = tmp_path / "project"
    (here / "calib").mkdir(parents=True)
    (here / "toy.onnx").write_bytes(toy.read_bytes())
    rng = np.random.default_rng(0)
    np.save(here / "calib" / "x.npy", rng.random((4, 3, 64, 64), dtype=np.float32))
    recipe = here / "r.yaml"
    recipe.write_text(
        "model: toy.onnx\n"
        "steps:\n"
        "  - quantize: {adapter: onnxruntime, calibration: calib/x.npy, subset_size: 4,"
        " val: generated:4}\n"
        "output: out\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = damo_opt("run", recipe, cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert (here / "out" / "01-quantize" / "model.onnx").is_file()
    assert not (elsewhere / "out").exists()
    rep = json.loads((here / "out" / "report.json").read_text())
    config = rep["steps"][-1]["config"]
    assert config["calibration"] == str(here / "calib" / "x.npy")
    assert config["val"] == "generated:4"  # a keyword, not a path


def test_recipe_path_rules(tmp_path: Path) -> None:
    recipe = tmp_path / "sub" / "r.yaml"
    recipe.parent.mkdir()
    recipe.write_text(
        "model: tiny-cnn\n"
        "steps:\n"
        "  - quantize: {adapter: onnxruntime, calibration: {images: imgs}, "
        f"val: {{coco: ann.json, images: {tmp_path / 'abs'}, split: val}}}}\n"
        "  - evaluate: {data: synthetic}\n"
        f"output: {tmp_path / 'absolute-out'}\n"
    )
    loaded = load_recipe(recipe, get_manager())
    q, ev = (s.config.model_dump() for s in loaded.steps)
    assert q["calibration"] == {"images": str(recipe.parent / "imgs")}
    assert q["val"] == {
        "coco": str(recipe.parent / "ann.json"),
        "images": str(tmp_path / "abs"),  # absolute: unchanged
        "split": "val",  # not a path key
    }
    assert ev["data"] == "synthetic"
    assert loaded.recipe.output == str(tmp_path / "absolute-out")
    # the same recipe as a mapping (Python API) keeps its caller's paths
    mapping = {"model": "tiny-cnn", "steps": [{"evaluate": {"data": "d"}}], "output": "o"}
    loaded = load_recipe(mapping, get_manager())
    assert loaded.steps[0].config.data == "d" and loaded.recipe.output == "o"


def test_a_missing_recipe_relative_model_is_reported_where_the_user_meant_it(
    tmp_path: Path,
) -> None:
    recipe = tmp_path / "sub" / "r.yaml"
    recipe.parent.mkdir()
    recipe.write_text("model: weights/best.pt\nsteps: [export]\n")
    proc = damo_opt("run", recipe, "-o", tmp_path / "o", cwd=tmp_path)
    assert_clean_error(proc, str(recipe.parent / "weights" / "best.pt"))


# --------------------------------------------------------------- 5. errors name the flag
@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--subset", "0"], "--subset"),
        (["--val", "generated:4", "--val-size", "0"], "--val-size"),
        (["--adapter", "onnxruntme"], "--adapter"),
        (["--target", "openvino"], None),  # refused by the adapter at run time: no recipe words
    ],
)
def test_quantize_errors_name_the_flag(
    tmp_path: Path, toy: Path, extra: list[str], flag: str | None
) -> None:
    proc = damo_opt(*quantize(toy), *extra, "-o", tmp_path / "q")
    assert proc.returncode == 2, proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("damo-opt: error:"))
    assert "<recipe>" not in line and "steps[0]" not in line, line
    if flag:
        assert f"error: {flag}:" in line, line


def test_fuse_and_export_errors_name_the_flag(tmp_path: Path) -> None:
    assert_clean_error(
        damo_opt("fuse", "tiny-cnn", "-o", tmp_path, "--tolerance", "-1"), "--tolerance"
    )
    # the one-shot export runs a recipe of several steps: still the flag, not steps[1].export
    oneshot = damo_opt(
        "export", "tiny-cnn", "--format", "onnx", "--tolerance", "-1", "-o", tmp_path / "m.onnx"
    )
    assert_clean_error(oneshot, "--tolerance: ")
    assert "steps[" not in oneshot.stderr and "<recipe>" not in oneshot.stderr


def test_flag_error_rewording() -> None:
    flags = {"subset_size": "--subset", "quantize.calibration": "--data"}
    cases = {
        "<recipe>:1: steps[0].quantize.subset_size: too small": "--subset: too small",
        "<recipe>:4: steps[2].quantize.calibration: no such folder": "--data: no such folder",
        "<recipe>:1: input_shape: every dimension": "--input-shape: every dimension",
        "<recipe>:1: arch: bad": "--arch: bad",
        "<recipe>: steps[1]: step 'convert' cannot take": "step 'convert' cannot take",
        "<recipe>:1: steps[0].quantize.preset: unknown": "quantize option 'preset': unknown",
        "r.yaml:1: steps[0].quantize.subset_size: x": "r.yaml:1: steps[0].quantize.subset_size: x",
    }
    for message, expected in cases.items():
        assert flag_error(DamoError(message, "hint"), flags).message == expected
    kept = flag_error(VerificationError("<recipe>:1: steps[0].x.y: z"), {})
    assert isinstance(kept, VerificationError) and kept.exit_code == 3


# ------------------------------------------------------- 6. a checkpoint's missing builder
PLUGIN = """
import torch
from damo_plugins.core.hookspecs import hookimpl


class TinyDet(torch.nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, width, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def build_tiny_det(width: int = 4):
    return TinyDet(width)


build_tiny_det.default_input_shape = [1, 3, 16, 16]


@hookimpl
def damo_models():
    return {"tiny-det": build_tiny_det}
"""


def test_a_checkpoint_whose_builder_is_gone_names_it(tmp_path: Path) -> None:
    from damo_plugins.core.artifact import load_model

    with installed("damo-tiny-det", {"damo_tiny_det": PLUGIN}, {"tiny-det": "damo_tiny_det"}):
        ckpt = load_model("tiny-det", manager=get_manager()).save(tmp_path, stem="det")
        assert damo_opt("info", ckpt, "--json").returncode == 0  # loads while installed
        disabled = damo_opt("info", ckpt, env={"DAMO_PLUGINS_DISABLE": "tiny-det"})
        assert_clean_error(
            disabled, "model builder 'tiny-det' is not installed", "DAMO_PLUGINS_DISABLE"
        )
    gone = damo_opt("info", ckpt)
    assert_clean_error(
        gone, str(ckpt), "model builder 'tiny-det' is not installed", "damo-opt plugins"
    )
    assert "did you mean" not in gone.stderr
    # a name the user typed still gets the suggestion
    assert_clean_error(damo_opt("info", "tiny-cnm"), "did you mean 'tiny-cnn'")


# ------------------------------------------------------- 7. --debug anywhere, broken pipes
def test_debug_is_accepted_anywhere(tmp_path: Path, toy: Path) -> None:
    for argv in (
        ["--debug", *quantize(toy), "--subset", "0", "-o", tmp_path / "q"],
        [*quantize(toy), "--debug", "--subset", "0", "-o", tmp_path / "q"],
        [*quantize(toy), "--subset", "0", "-o", tmp_path / "q", "--debug"],
    ):
        proc = damo_opt(*argv)
        assert proc.returncode != 0 and "Traceback" in proc.stderr, proc.stderr[-500:]
        assert "unrecognized arguments" not in proc.stderr
    ok = damo_opt("nas", "score", "--debug", "t", "--json")
    assert json.loads(ok.stdout)["layers"] == 19


def test_broken_pipe_under_json_is_quiet() -> None:
    proc = subprocess.run(
        f"{sys.executable} -m damo_plugins.cli info tiny-cnn --json | head -c 1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.stdout == "{"
    assert proc.stderr == "", proc.stderr
