"""An event listener can never change a run: any exception it raises — ``SystemExit`` and
other ``BaseException`` subclasses included — is reported naming the plugin, and the
pipeline's result is what it would have been. Ctrl-C (``KeyboardInterrupt``) still stops."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

from damo_plugins.core.hookspecs import hookimpl
from damo_plugins.core.manager import PluginManager, PluginWarning
from damo_plugins.core.pipeline import run


class Fatal(BaseException):
    """Not an Exception: what a careless listener might raise to "abort"."""


class Exits:
    @hookimpl
    def damo_pipeline_started(self, recipe: Any, output: str) -> None:
        raise SystemExit(3)

    @hookimpl
    def damo_step_finished(self, step: str) -> None:
        raise SystemExit("listener wants out")


class RaisesFatal:
    @hookimpl
    def damo_pipeline_finished(self, report: Any) -> None:
        raise Fatal("from a listener")


class Interrupts:
    @hookimpl
    def damo_step_finished(self, step: str) -> None:
        raise KeyboardInterrupt


def _manager(*listeners: tuple[str, object]) -> PluginManager:
    mgr = PluginManager(load_only=["tiny-cnn", "export"])
    for name, obj in listeners:
        mgr.register(obj, name)
    return mgr


def test_system_exit_and_base_exceptions_from_listeners_are_isolated(tmp_path: Path):
    mgr = _manager(("exits", Exits()), ("fatal", RaisesFatal()))
    recipe = {"model": "tiny-cnn", "steps": [{"export": {"opset": 17}}]}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        res = run(recipe, manager=mgr, output=tmp_path / "out", log=lambda s: None)
    assert res.report["status"] == "ok"
    assert (tmp_path / "out" / "01-export" / "model.onnx").is_file()
    messages = [str(w.message) for w in record if issubclass(w.category, PluginWarning)]
    assert any(
        "'exits'" in m and "damo_pipeline_started" in m and "SystemExit" in m for m in messages
    )
    assert any("'exits'" in m and "damo_step_finished" in m for m in messages)
    assert any("'fatal'" in m and "Fatal: from a listener" in m for m in messages)
    assert len(messages) == 3, messages


def test_keyboard_interrupt_in_a_listener_still_stops(tmp_path: Path):
    mgr = _manager(("interrupts", Interrupts()))
    with pytest.raises(KeyboardInterrupt):
        mgr.notify("damo_step_finished", step="x", before=None, after=None, metrics={})
