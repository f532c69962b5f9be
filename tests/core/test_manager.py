"""Plugin discovery through entry points, disabling, fault isolation, duplicates."""

from __future__ import annotations

import json
import warnings

import pytest

from damo_plugins.core.manager import PluginManager, PluginWarning
from tests.conftest import assert_clean_error, damo_opt

BUILTIN_PASSES = {"export", "convert"}
ADAPTERS = {"openvino", "nncf", "inc", "onnxruntime"}

GOOD = """
from damo_plugins import Pass, hookimpl

class Shout(Pass):
    name = "shout"

@hookimpl
def damo_passes():
    return [Shout]
"""


def test_builtins_and_adapters_come_from_entry_points() -> None:
    mgr = PluginManager()
    by_name = {c.name: c for c in mgr.contributions()}
    assert BUILTIN_PASSES <= set(mgr.names("pass"))
    assert ADAPTERS <= set(mgr.names("adapter"))
    assert by_name["export"].plugin.distribution == "damo-plugins"
    assert by_name["export"].plugin.entry_point == "export = damo_plugins.plugins.export"
    dists = {by_name[a].plugin.distribution for a in ADAPTERS}
    assert dists == {
        "damo-plugins-openvino",
        "damo-plugins-nncf",
        "damo-plugins-inc",
        "damo-plugins-onnxruntime",
    }
    assert not mgr.failures


def test_third_party_dist_is_discovered(plugin_path) -> None:
    plugin_path("shout-dist", {"shout_plugin": GOOD}, {"shout": "shout_plugin"})
    mgr = PluginManager()
    c = mgr.get("pass", "shout")
    assert (c.plugin.name, c.plugin.distribution, c.plugin.version) == (
        "shout",
        "shout-dist",
        "0.0.1",
    )


def test_disable_and_load_only(plugin_path, monkeypatch) -> None:
    plugin_path("shout-dist", {"shout_plugin": GOOD}, {"shout": "shout_plugin"})
    monkeypatch.setenv("DAMO_PLUGINS_DISABLE", "shout, onnxruntime")
    mgr = PluginManager()
    assert "shout" not in mgr.names("pass")
    assert "onnxruntime" not in mgr.names("adapter")
    assert "openvino" in mgr.names("adapter")
    monkeypatch.delenv("DAMO_PLUGINS_DISABLE")
    monkeypatch.setenv("DAMO_PLUGINS_LOAD", "shout")
    mgr = PluginManager()
    assert set(mgr.info) == {"shout"}
    assert mgr.names("pass") == ["shout"]


def test_disable_through_cli(plugin_path) -> None:
    plugin_path("shout-dist", {"shout_plugin": GOOD}, {"shout": "shout_plugin"})
    listed = json.loads(damo_opt("plugins", "--json").stdout)
    assert {
        "name": "shout",
        "kind": "pass",
        "distribution": "shout-dist",
        "version": "0.0.1",
        "entry_point": "shout = shout_plugin",
    } in listed
    listed = json.loads(damo_opt("plugins", "--json", env={"DAMO_PLUGINS_DISABLE": "shout"}).stdout)
    assert "shout" not in {r["name"] for r in listed}


BROKEN = {
    "import": "raise ImportError('needs libfoo')\n",
    "raising": """
from damo_plugins import hookimpl

@hookimpl
def damo_passes():
    raise RuntimeError('boom')
""",
    "wrongtype": """
from damo_plugins import hookimpl

@hookimpl
def damo_passes():
    return ["not a pass", 42]

@hookimpl
def damo_models():
    return ["not a mapping"]
""",
    "misspelled": """
from damo_plugins import hookimpl

@hookimpl
def damo_pases():
    return []
""",
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_plugin_is_named_and_others_work(plugin_path, kind: str) -> None:
    plugin_path(
        f"broken-{kind}", {f"broken_{kind}": BROKEN[kind]}, {f"broken-{kind}": f"broken_{kind}"}
    )
    plugin_path("shout-dist", {"shout_plugin": GOOD}, {"shout": "shout_plugin"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mgr = PluginManager()
        names = mgr.names("pass")
    messages = [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]
    assert any(f"broken-{kind}" in m and f"broken-{kind} 0.0.1" in m for m in messages), messages
    assert "shout" in names and BUILTIN_PASSES <= set(names)
    # and through the CLI: a warning line, exit 0, the rest listed
    proc = damo_opt("plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    assert f"broken-{kind}" in proc.stderr and "Traceback" not in proc.stderr
    assert "shout" in {r["name"] for r in json.loads(proc.stdout)}


def test_duplicate_names_name_both_plugins(plugin_path) -> None:
    plugin_path("dist-a", {"plug_a": GOOD}, {"plug-a": "plug_a"})
    plugin_path("dist-b", {"plug_b": GOOD}, {"plug-b": "plug_b"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mgr = PluginManager()
        mgr.names("pass")
    assert any("plug-a" in str(w.message) and "plug-b" in str(w.message) for w in caught)
    from damo_plugins.core.errors import PluginError

    with pytest.raises(PluginError, match=r"plug-a.*dist-a.*plug-b.*dist-b"):
        mgr.get_pass("shout")
    assert mgr.get_pass("export")  # everything else keeps working
    proc = damo_opt("info", "tiny-cnn", "--json", env={"DAMO_PLUGINS_DISABLE": "plug-b"})
    assert proc.returncode == 0, proc.stderr


def test_event_listener_failure_is_reported_not_fatal() -> None:
    calls = []

    class Listener:
        from damo_plugins import hookimpl

        @hookimpl
        def damo_pipeline_finished(self, report):
            calls.append(report["status"])
            raise ValueError("listener bug")

    mgr = PluginManager()
    mgr.register(Listener(), "listener")
    with pytest.warns(PluginWarning, match="listener"):
        mgr.notify("damo_pipeline_finished", report={"status": "ok"})
    assert calls == ["ok"]


def test_unknown_name_suggests_closest() -> None:
    from damo_plugins.core.errors import DamoError

    with pytest.raises(DamoError, match="did you mean 'export'"):
        PluginManager().get_pass("exprot")


# -------------------------------------------------- isolation of BaseException, names
EXITING = {
    "exit-at-import": "import sys\nsys.exit(0)\n",
    "exit-in-hook": """
import sys
from damo_plugins import hookimpl

@hookimpl
def damo_passes():
    sys.exit(3)
""",
    "bad-name": """
from damo_plugins import Pass, hookimpl

class NoName(Pass):
    name = 42

class Spaced(Pass):
    name = "has space"

@hookimpl
def damo_passes():
    return [NoName, Spaced]
""",
}


@pytest.mark.parametrize("kind", sorted(EXITING))
def test_sys_exit_or_bad_names_in_a_plugin_are_isolated(plugin_path, tmp_path, kind: str) -> None:
    """A plugin calling sys.exit (at import or in a hook) or naming a pass 42 is reported by
    name; every command keeps working (it used to exit 0 doing nothing, or TypeError)."""
    module = kind.replace("-", "_")
    plugin_path(f"dist-{kind}", {module: EXITING[kind]}, {kind: module})
    proc = damo_opt("plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    assert kind in proc.stderr and "Traceback" not in proc.stderr
    assert "export" in {r["name"] for r in json.loads(proc.stdout)}
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-cnn\nsteps: [export]\n")
    run = damo_opt("run", str(recipe), "-o", str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "out" / "report.json").read_text())["status"] == "ok"


def test_listener_sys_exit_does_not_change_the_run(tmp_path) -> None:
    class Quitter:
        from damo_plugins import hookimpl

        @hookimpl
        def damo_step_finished(self, step, before, after, metrics):
            raise SystemExit(0)

    from damo_plugins.core.pipeline import run

    mgr = PluginManager()
    mgr.register(Quitter(), "quitter")
    with pytest.warns(PluginWarning, match="quitter.*SystemExit"):
        res = run(
            {"model": "tiny-cnn", "steps": ["export"]},
            output=tmp_path / "o",
            manager=mgr,
            log=print,
        )
    assert res.report["status"] == "ok"


def test_a_shadowed_step_names_both_plugins(plugin_path, tmp_path) -> None:
    plugin_path("dist-a", {"plug_a": GOOD}, {"plug-a": "plug_a"})
    plugin_path("dist-b", {"plug_b": GOOD}, {"plug-b": "plug_b"})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-cnn\nsteps: [shout]\n")
    proc = damo_opt("run", str(recipe), "--dry-run")
    assert_clean_error(
        proc,
        "step 'shout' is provided by 2 plugins: plug-a (dist-a 0.0.1) and plug-b (dist-b 0.0.1)",
        "DAMO_PLUGINS_DISABLE=plug-b",
    )


def test_unknown_names_in_disable_and_load_lists_warn(monkeypatch) -> None:
    monkeypatch.setenv("DAMO_PLUGINS_DISABLE", "quantise")
    with pytest.warns(
        PluginWarning, match=r"DAMO_PLUGINS_DISABLE names 'quantise'.*did you mean 'quantize'"
    ):
        PluginManager()
