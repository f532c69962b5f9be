"""Start-up cost: commands that only read what plugins declare import no heavy library.

Every ``damo-opt`` command imports every plugin module (entry points of the ``damo_plugins``
group, the adapter distributions included) and calls their contribution hooks; ``--help``
also calls every ``damo_cli`` hook. One ``import torch`` at the top of any of those modules
makes ``--help`` cost as much as importing torch (seconds). The rule (``docs/architecture.md``):
plugin modules and adapter packages import heavy libraries inside the functions that need
them. These tests check the behaviour, not the timing: after the command ran in a fresh
interpreter, none of the heavy modules is in ``sys.modules``. ``benchmarks/bench_cli.py``
measures the time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from damo_plugins.testing import installed

HEAVY = (
    "torch",
    "onnx",
    "onnxruntime",
    "openvino",
    "nncf",
    "neural_compressor",
    "torch_pruning",
    "matplotlib",
)

#: runs in a fresh interpreter: argv[1] = JSON list of CLI arguments (or null: import the
#: public API and core only), argv[2] = where to write the result. A meta-path hook notes, for
#: each heavy package, the innermost source line that triggered its first import.
PROBE = r"""
import json, sys, traceback

HEAVY = set(json.loads(sys.argv[3]))
culprits = {}


class Watch:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in HEAVY and top not in culprits and top not in sys.modules:
            frames = [
                f for f in traceback.extract_stack()[:-1]
                if not f.filename.startswith("<") and "importlib" not in f.filename
            ]
            culprits[top] = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        return None


sys.meta_path.insert(0, Watch())
argv = json.loads(sys.argv[1])
if argv is None:
    import pkgutil

    import damo_plugins
    import damo_plugins.core

    for mod in pkgutil.iter_modules(damo_plugins.core.__path__, "damo_plugins.core."):
        __import__(mod.name)
    rc = 0
else:
    from damo_plugins.cli import main

    try:
        rc = main(argv)
    except SystemExit as exc:  # --help exits through argparse
        rc = exc.code
with open(sys.argv[2], "w") as fh:
    json.dump({"rc": rc, "heavy": sorted(set(culprits) | (HEAVY & set(sys.modules))),
               "culprits": culprits}, fh)
"""

RECIPE = """\
model: damo-yolo-s
input_shape: [1, 3, 320, 320]
steps:
  - reparam
  - prune: {ratio: 0.2}
  - export: {opset: 17}
  - quantize: {adapter: nncf, calibration: generated, subset_size: 8}
  - benchmark: {adapter: openvino, iterations: 5}
  - evaluate: {data: generated, images: 4}
"""


def _probe(tmp_path: Path, argv: list[str] | None) -> tuple[dict[str, Any], str]:
    """Run ``damo-opt ARGV`` (or the core imports) in a fresh interpreter; (result, stdout)."""
    out = tmp_path / "probe.json"
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argv), str(out), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0 and out.is_file(), proc.stderr
    return json.loads(out.read_text()), proc.stdout


def _assert_light(result: dict[str, Any], what: str) -> None:
    where = "; ".join(f"{mod} first imported at {line}" for mod, line in result["culprits"].items())
    assert not result["heavy"], (
        f"{what} imported {result['heavy']} ({where}): import heavy libraries inside the "
        "functions that use them"
    )


def test_plugins_json_imports_no_heavy_library(tmp_path: Path) -> None:
    result, stdout = _probe(tmp_path, ["plugins", "--json"])
    assert result["rc"] == 0
    rows = {(r["name"], r["kind"]) for r in json.loads(stdout)}
    # every hook really ran: builders, passes and adapters of the built-ins and the adapters
    for row in [
        ("damo-yolo-s", "model"),
        ("tiny-cnn", "model"),
        ("keypoint-rcnn-head", "model"),
        ("prune", "pass"),
        ("distill", "pass"),
        ("reparam", "pass"),
        ("evaluate", "pass"),
        ("quantize", "pass"),
        ("generated", "calibration"),
        ("openvino", "adapter"),
        ("nncf", "adapter"),
        ("inc", "adapter"),
        ("onnxruntime", "adapter"),
    ]:
        assert row in rows, row
    _assert_light(result, "damo-opt plugins --json")


def test_help_imports_no_heavy_library(tmp_path: Path) -> None:
    result, stdout = _probe(tmp_path, ["--help"])
    assert result["rc"] == 0
    for verb in ("fuse", "export", "quantize", "bench", "nas", "train", "keypoints"):
        assert verb in stdout, f"verb {verb} missing from --help: a damo_cli hook did not run"
    _assert_light(result, "damo-opt --help")


def test_recipe_validation_imports_no_heavy_library(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    result, stdout = _probe(tmp_path, ["run", str(recipe), "--dry-run"])
    assert result["rc"] == 0
    steps = [ln.split()[1] for ln in stdout.splitlines()[1:]]
    assert steps == ["reparam", "prune", "export", "quantize", "benchmark", "evaluate"]
    _assert_light(result, "damo-opt run --dry-run")


def test_public_api_and_core_import_no_heavy_library(tmp_path: Path) -> None:
    result, _ = _probe(tmp_path, None)
    _assert_light(result, "import damo_plugins / damo_plugins.core.*")


def test_the_check_fails_on_a_plugin_importing_torch_at_load(tmp_path: Path) -> None:
    """The check can fail: one installed plugin with ``import torch`` on top is caught, and
    the message names its file."""
    source = "import torch\n\nfrom damo_plugins.core.hookspecs import hookimpl\n"
    with installed("heavy-at-import", {"heavy_at_import": source}, {"heavy": "heavy_at_import"}):
        result, _ = _probe(tmp_path, ["plugins", "--json"])
    assert result["rc"] == 0
    assert "torch" in result["heavy"]
    assert result["culprits"]["torch"].endswith("heavy_at_import.py:1")
    with pytest.raises(AssertionError, match=r"heavy_at_import\.py:1"):
        _assert_light(result, "damo-opt plugins --json")


def test_train_help_names_the_default_model() -> None:
    """``damo-opt train --help`` states the default without importing the trainer (torch);
    the stated default must be the one the trainer uses."""
    from damo_plugins.plugins import train as train_plugin
    from damo_plugins.train.trainer import DEFAULT_MODEL, DEFAULT_MODEL_ARGS

    assert train_plugin._DEFAULT_MODEL_HELP == (
        f"{DEFAULT_MODEL}, width {DEFAULT_MODEL_ARGS['width']}"
    )
