"""``damo_plugins.testing``, used the way a plugin author's test suite would use it.

Only the helper module is imported: if these tests pass, a third party can install a plugin
distribution, see it listed, run its pass in a recipe and switch it off, with nothing else.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from damo_plugins.testing import (
    assert_clean_error,
    fresh_manager,
    installed,
    make_distribution,
    run_cli,
)

#: a complete plugin: ``count`` copies the model and records its parameter count as a metric
COUNT = '''
    """One pass: ``count``."""
    import copy

    from damo_plugins import Pass, PassConfig, hookimpl


    class CountConfig(PassConfig):
        label: str = "params"


    class CountPass(Pass):
        name = "count"
        accepts = ("torch",)
        Config = CountConfig

        def run(self, artifact, ctx):
            ctx.extra[self.config.label] = artifact.param_count()
            return artifact.derive(model=copy.deepcopy(artifact.model))


    @hookimpl
    def damo_passes():
        return [CountPass]
'''

ROW = {
    "name": "count",
    "kind": "pass",
    "distribution": "count-dist",
    "version": "0.0.1",
    "entry_point": "count = count_plugin",
}


def _rows(proc: subprocess.CompletedProcess[str]) -> list[dict[str, str]]:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_install_list_run_disable(tmp_path: Path) -> None:
    before_path, before_env = list(sys.path), os.environ.get("PYTHONPATH")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-cnn\nsteps:\n  - count: {label: n}\n  - export\n")
    with installed("count-dist", {"count_plugin": COUNT}, {"count": "count_plugin"}) as site:
        assert (site / "count_plugin.py").is_file()
        assert str(site) in sys.path
        assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == str(site)
        # in this process: the process-wide manager was rebuilt and sees the new plugin
        assert fresh_manager().get_pass("count").__module__ == "count_plugin"
        # in a subprocess, as a user sees it
        assert ROW in _rows(run_cli("plugins", "--json"))
        proc = run_cli("run", recipe, "-o", tmp_path / "out")
        assert proc.returncode == 0, proc.stderr
        steps = json.loads((tmp_path / "out" / "report.json").read_text())["steps"]
        assert [s["step"] for s in steps] == ["input", "count", "export"]
        assert steps[1]["metrics"] == {"n": 1586}  # tiny-cnn's parameter count
        assert steps[1]["verification"]["passed"] and steps[2]["verification"]["passed"]
        # switched off by name, in a subprocess and in this process
        off = {"DAMO_PLUGINS_DISABLE": "count"}
        assert ROW not in _rows(run_cli("plugins", "--json", env=off))
        assert_clean_error(run_cli("run", recipe, "--dry-run", env=off), "unknown step 'count'")
        assert "count" not in fresh_manager(disable=["count"]).names("pass")
        assert "count" in fresh_manager(load_only=["count"]).names("pass")
        # env=None removes a variable: without PYTHONPATH the subprocess cannot see it
        assert ROW not in _rows(run_cli("plugins", "--json", env={"PYTHONPATH": None}))
    # everything is as it was: path, environment, import cache, manager, files
    assert sys.path == before_path and os.environ.get("PYTHONPATH") == before_env
    assert "count_plugin" not in sys.modules
    assert "count" not in fresh_manager().names("pass")
    assert not site.exists()


def test_reinstalling_a_module_reads_the_new_source(tmp_path: Path) -> None:
    """A second install of the same module name must not be served from the import cache."""
    with installed("count-dist", {"count_plugin": COUNT}, {"count": "count_plugin"}):
        assert "count" in fresh_manager().names("pass")
    tally = COUNT.replace('name = "count"', 'name = "tally"')
    with installed("tally-dist", {"count_plugin": tally}, {"tally": "count_plugin"}):
        names = fresh_manager().names("pass")
        assert "tally" in names and "count" not in names


def test_nested_installs_and_a_given_root(tmp_path: Path) -> None:
    root = tmp_path / "site"
    with (
        installed("count-dist", {"count_plugin": COUNT}, {"count": "count_plugin"}, root=root),
        installed("other-dist", {"other_plugin": "X = 1\n"}, {"other": "other_plugin"}),
    ):
        mgr = fresh_manager()
        assert "count" in mgr.names("pass") and "other" in mgr.info
    assert (root / "count_plugin.py").is_file()  # a root the caller gave is kept
    assert "other" not in fresh_manager().info


def test_make_distribution_is_a_real_distribution(tmp_path: Path) -> None:
    root = make_distribution(
        tmp_path / "site",
        "My.Plugin-Dist",
        {"pkg": "X = 1\n", "pkg.sub.leaf": "Y = 2\n"},
        {"mine": "pkg.sub.leaf"},
        version="1.2.3",
    )
    assert (root / "pkg" / "__init__.py").read_text() == "X = 1\n"
    assert (root / "pkg" / "sub" / "__init__.py").read_text() == ""
    assert (root / "pkg" / "sub" / "leaf.py").read_text() == "Y = 2\n"
    (dist,) = md.distributions(path=[str(root)])
    assert (dist.metadata["Name"], dist.version) == ("My.Plugin-Dist", "1.2.3")
    (ep,) = dist.entry_points
    assert (ep.group, ep.name, ep.value) == ("damo_plugins", "mine", "pkg.sub.leaf")
    # a second distribution may share the folder, but not its name or a module
    make_distribution(root, "second", {"second_mod": ""}, {"second": "second_mod"})
    assert len(list(md.distributions(path=[str(root)]))) == 2
    with pytest.raises(ValueError, match="already exists"):
        make_distribution(root, "my_plugin.dist", {}, {})
    with pytest.raises(ValueError, match="already exists"):
        make_distribution(root, "third", {"second_mod": ""}, {})


@pytest.mark.parametrize(
    ("name", "modules", "entry_points", "match"),
    [
        ("bad name", {}, {}, "distribution name"),
        ("ok", {"not-a-module": ""}, {}, "dotted Python identifier"),
        ("ok", {}, {"has space": "m"}, "entry-point name"),
        ("ok", {}, {"x": ""}, "needs a target"),
    ],
)
def test_make_distribution_rejects_what_pip_could_not_install(
    tmp_path: Path, name: str, modules: dict, entry_points: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        make_distribution(tmp_path, name, modules, entry_points)
    assert not list(tmp_path.iterdir())  # nothing half-written


def _proc(code: int, stderr: str) -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(["damo-opt"], code, "", stderr)


def test_assert_clean_error_can_fail() -> None:
    assert_clean_error(_proc(2, "damo-opt: error: unknown model 'x' (did you mean 'y'?)\n"), "X")
    assert_clean_error(_proc(3, "damo-opt: error: step 'a' failed verification\n"), code=3)
    broken = [
        (_proc(1, "damo-opt: error: x\n"), "exit status 2, got 1"),
        (_proc(2, "Traceback (most recent call last):\ndamo-opt: error: x\n"), "traceback"),
        (_proc(2, "damo-opt: error: x\ndamo-opt: error: y\n"), "found 2"),
        (_proc(2, "something went wrong\n"), "found 0"),
        (_proc(2, "damo-opt: error: bad model 'x'\n"), "does not mention \\['unknown'\\]"),
    ]
    for proc, why in broken:
        with pytest.raises(AssertionError, match=why):
            assert_clean_error(proc, "x", "unknown")
