"""The layers of docs/architecture.md, enforced: nothing imports upward.

Every ``import`` statement in the package and the adapter distributions is read with ``ast``
(function-level and ``TYPE_CHECKING`` imports included: a lazy import is still a dependency)
and checked against the layer table below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: layer of each top-level part of ``damo_plugins``; a module may import its own layer or lower
LAYERS = {
    "core": 0,
    "testing": 0,
    "lib": 1,
    "models": 2,
    "nas": 2,
    "keypoints": 2,
    "data": 2,
    "train": 2,
    "plugins": 3,
    "api": 4,
    "optimize": 4,
    "demo": 4,
    "cli": 5,
}
#: distributions outside the package: they may use core and lib only
EXTERNAL = {"damo_openvino", "damo_nncf", "damo_inc", "damo_onnxruntime", "damo_mlflow"}


def _sources() -> list[tuple[str, Path]]:
    """(importing module's top package or layer, file) for every source file we check."""
    out = []
    for path in sorted((REPO / "damo_plugins").rglob("*.py")):
        rel = path.relative_to(REPO / "damo_plugins")
        part = rel.parts[0].removesuffix(".py")
        if part == "__init__":
            continue  # the public API re-exports core and may import nothing else (checked below)
        out.append((part, path))
    for root in ("adapters", "integrations"):
        for path in sorted((REPO / root).glob("*/damo_*/**/*.py")):
            pkg = next(p for p in path.parts if p.startswith("damo_"))
            out.append((pkg, path))
    return out


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "damo_plugins":  # from damo_plugins import core, lib, ...
                found += [(node.lineno, f"damo_plugins.{a.name}") for a in node.names]
    return found


def _violation(part: str, target: str) -> str | None:
    pieces = target.split(".")
    if pieces[0] in EXTERNAL and pieces[0] != part:
        return "an adapter or integration imports another distribution's package"
    if pieces[0] != "damo_plugins" or len(pieces) < 2:
        return None
    layer = pieces[1]
    if layer in ("__version__", "hookimpl"):
        return None
    if layer not in LAYERS:
        return f"unknown part damo_plugins.{layer} (add it to the layer table)"
    if part in EXTERNAL:
        return None if LAYERS[layer] <= LAYERS["lib"] else "adapters import only core and lib"
    if LAYERS[layer] > LAYERS[part]:
        return f"{part} (layer {LAYERS[part]}) imports {layer} (layer {LAYERS[layer]})"
    if part == "plugins" and layer == "plugins":
        return "a plugin imports another plugin (disabling one must not break the other)"
    return None


def test_no_upward_imports() -> None:
    problems = []
    for part, path in _sources():
        for line, target in _imports(path):
            why = _violation(part, target)
            if why:
                problems.append(f"{path.relative_to(REPO)}:{line}: {target}: {why}")
    assert not problems, "\n".join(problems)


def test_public_api_imports_core_only() -> None:
    for line, target in _imports(REPO / "damo_plugins" / "__init__.py"):
        if target.startswith("damo_plugins."):
            assert target.split(".")[1] == "core", f"__init__.py:{line} imports {target}"


@pytest.mark.parametrize(
    ("part", "target", "bad"),
    [
        ("core", "damo_plugins.plugins.quantize", True),
        ("lib", "damo_plugins.data.coco", True),
        ("plugins", "damo_plugins.plugins.export", True),
        ("damo_nncf", "damo_openvino.adapter", True),
        ("damo_nncf", "damo_plugins.plugins.quantize", True),
        ("damo_nncf", "damo_plugins.lib.decode", False),
        ("plugins", "damo_plugins.train.prune", False),
        ("cli", "damo_plugins.core.verbs", False),
    ],
)
def test_the_rule_itself(part: str, target: str, bad: bool) -> None:
    """The checker can fail: known upward imports are flagged, allowed ones are not."""
    assert (_violation(part, target) is not None) == bad
