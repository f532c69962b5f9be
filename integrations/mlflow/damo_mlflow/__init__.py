"""damo-plugins-mlflow: pipeline runs tracked in MLflow, through the ``damo_plugins`` group.

Off unless ``DAMO_MLFLOW`` or ``MLFLOW_TRACKING_URI`` is set (``damo-opt run --mlflow [URI]``
sets the first): the hooks below then cost a few look-ups and MLflow is never imported. See
:mod:`damo_mlflow.settings` for the variables and :mod:`damo_mlflow.tracker` for what is
logged. ``parent_run`` opens a run that pipeline runs nest under (optimize candidates).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from damo_mlflow import tracker
from damo_mlflow.settings import enabled
from damo_mlflow.tracker import ParentRun, parent_run
from damo_plugins.core.hookspecs import hookimpl

__all__ = ["ParentRun", "enabled", "parent_run"]


@hookimpl
def damo_pipeline_started(recipe: Any, output: str) -> None:
    tracker.pipeline_started(recipe, output)


@hookimpl
def damo_step_finished(step: str, before: Any, after: Any, metrics: Mapping[str, Any]) -> None:
    tracker.step_finished(step, metrics)


@hookimpl
def damo_pipeline_finished(report: Mapping[str, Any]) -> None:
    tracker.pipeline_finished(report)
