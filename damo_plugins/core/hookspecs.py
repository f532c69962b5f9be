"""The contract between damo-plugins and its plugins.

A plugin is any module registered in the ``damo_plugins`` entry-point group that implements
some of the hooks below with :data:`hookimpl`. Built-in passes, models and adapters use the
very same path as third-party plugins.

Design choices (after pytest, simonw/llm, datasette and tox 4):

* **Contribution hooks return lists or mappings** (``damo_passes``, ``damo_adapters``, ...)
  rather than calling a ``register(...)`` callback. Returning values keeps plugins free of
  side effects and lets the manager call each plugin's implementation separately, so it can
  say *which* plugin provided what (duplicate names are reported with both plugins) and a
  plugin whose hook raises is skipped with a warning instead of breaking the others.
* **No** ``firstresult``: every plugin contributes; precedence is never silent.
* **No** ``historic`` hooks: plugins are discovered once, before anything is asked of them.
* **Events** (``damo_pipeline_started``, ``damo_step_finished``, ``damo_pipeline_finished``)
  are notifications for logging, experiment tracking or CI gates. Their return values are
  ignored; an exception in one listener is reported and does not stop the run.
* ``damo_cli`` lets a plugin add verbs to ``damo-opt`` (like llm's ``register_commands``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import argparse

    from damo_plugins.core.adapter import Adapter
    from damo_plugins.core.passes import Pass

PROJECT = "damo_plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def damo_passes() -> Sequence[type[Pass]]:
    """Return the :class:`~damo_plugins.core.passes.Pass` subclasses this plugin provides.

    Each class's ``name`` is the step name used in recipes (``reparam``, ``export``, ...).
    """


@hookspec
def damo_adapters() -> Sequence[Adapter]:
    """Return :class:`~damo_plugins.core.adapter.Adapter` instances (one per backend).

    Creating an adapter must be cheap and must not import its backend: the backend is
    imported only when the adapter is asked to do work, so ``damo-opt plugins`` stays fast
    and a missing backend is reported clearly at the point of use.
    """


@hookspec
def damo_models() -> Mapping[str, Callable[..., Any]]:
    """Return named model builders, ``{"damo-yolo-s": build_fn, ...}``.

    A builder takes keyword arguments (all optional) and returns a ``torch.nn.Module``.
    The builder may carry ``default_input_shape`` (e.g. ``[1, 3, 640, 640]``) as an
    attribute; artifacts use it when a recipe gives no ``input_shape``.
    """


@hookspec
def damo_calibration_sources() -> Mapping[str, Callable[..., Any]]:
    """Return named calibration data readers, ``{"images": read_folder, ...}``.

    A reader is called with its configuration as keyword arguments plus ``input_shape`` and
    returns an iterable of ``numpy`` arrays shaped like the model input.
    """


@hookspec
def damo_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add sub-commands to ``damo-opt``.

    ``subparsers`` is the ``argparse`` sub-parser action; set ``func=`` with
    ``parser.set_defaults(func=callable)``. The callable receives the parsed namespace and
    returns an exit status (or ``None`` for 0).
    """


@hookspec
def damo_pipeline_started(recipe: Any, output: str) -> None:
    """A pipeline run is starting; ``recipe`` is the validated recipe."""


@hookspec
def damo_step_finished(step: str, before: Any, after: Any, metrics: Mapping[str, Any]) -> None:
    """A step finished. ``before``/``after`` are the artifacts; ``metrics`` its report entry."""


@hookspec
def damo_pipeline_finished(report: Mapping[str, Any]) -> None:
    """A pipeline run finished (successfully or not); ``report`` is what ``report.json`` holds."""
