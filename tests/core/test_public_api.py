"""The public API and the plugin guide cannot drift apart.

``damo_plugins.__all__`` is what third parties may import; ``docs/plugins.md`` describes each
name in one line. These tests read the guide's tables, its paths and its code excerpts and
compare them with the code, so renaming, adding or removing something without updating the
guide fails here.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import damo_plugins
from damo_plugins import testing
from damo_plugins.core import hookspecs

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "plugins.md"

#: what importing the public API (or the testing helper) must not drag in
HEAVY = (
    "torch",
    "onnx",
    "onnxruntime",
    "openvino",
    "nncf",
    "neural_compressor",
    "ray",
    "mlflow",
    "matplotlib",
    "pytest",
)


def _section(title: str) -> str:
    """The text of the guide's ``## title`` section (up to the next ``##`` heading)."""
    text = GUIDE.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def _table(title: str) -> dict[str, str]:
    """First-column names (without an argument list) -> second column, of a section's table."""
    rows: dict[str, str] = {}
    for line in _section(title).splitlines():
        m = re.match(r"^\| `([^`(]+)(?:\([^`]*\))?` \| (.*?) \|", line)
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} is listed twice in '{title}'"
            rows[m.group(1)] = m.group(2).strip()
    return rows


def test_all_is_the_documented_table() -> None:
    documented = _table("The public API")
    assert len(documented) >= 10, "the table was not found or not parsed"
    assert sorted(documented) == sorted(damo_plugins.__all__), (
        "docs/plugins.md 'The public API' and damo_plugins.__all__ differ: "
        f"only documented {sorted(set(documented) - set(damo_plugins.__all__))}, "
        f"only exported {sorted(set(damo_plugins.__all__) - set(documented))}"
    )
    assert all(len(line) > 10 for line in documented.values()), documented


@pytest.mark.parametrize("name", damo_plugins.__all__)
def test_every_public_name_imports(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from damo_plugins import {name}", namespace)
    assert namespace[name] is getattr(damo_plugins, name) is not None


def test_public_api_is_core_and_stays_light() -> None:
    """Everything exported is defined in ``damo_plugins`` itself or its core layer, and
    importing it (or the testing helper) imports no heavy library: plugins import it at
    module level, and ``damo-opt --help`` loads every plugin."""
    for name in damo_plugins.__all__:
        obj = getattr(damo_plugins, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__.split(".")[:2] in (["damo_plugins", "core"], ["damo_plugins"])
    probe = (
        "import json, sys, damo_plugins, damo_plugins.testing; "
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_hook_table_lists_every_hook() -> None:
    specs = {
        n for n, _ in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("damo_")
    }
    assert set(_table("The hooks")) == specs


def test_testing_table_lists_every_helper() -> None:
    assert set(_table("Testing your plugin")) == set(testing.__all__)


def test_paths_and_modules_named_in_the_guide_exist() -> None:
    text = GUIDE.read_text()
    paths = set(re.findall(r"`((?:damo_plugins|docs|adapters|tests|integrations)/[^`\s]*)`", text))
    concrete = {p.split("::")[0] for p in paths if not re.search(r"[<*]", p)}
    assert "damo_plugins/core/hookspecs.py" in concrete
    missing = sorted(p for p in concrete if not (REPO / p).exists())
    assert not missing, f"docs/plugins.md names paths that do not exist: {missing}"
    for dotted in set(re.findall(r"`(damo_plugins(?:\.\w+)+)`", text)):
        try:
            importlib.import_module(dotted)
        except ImportError:
            module, _, attr = dotted.rpartition(".")
            assert hasattr(importlib.import_module(module), attr), dotted


def test_code_excerpts_are_in_the_example_plugin() -> None:
    """A block after ``<!-- from PATH -->`` is copied from PATH: every line must still be there."""
    text = GUIDE.read_text()
    excerpts = re.findall(r"<!-- from (\S+) -->\n```python\n(.*?)```", text, re.S)
    assert len(excerpts) >= 4
    for path, block in excerpts:
        source = set((REPO / path).read_text().splitlines())
        stale = [ln for ln in block.splitlines() if ln.strip() and ln not in source]
        assert not stale, f"docs/plugins.md quotes lines {path} does not have: {stale}"
