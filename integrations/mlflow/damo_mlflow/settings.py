"""When and where to track: read from the environment only, without importing MLflow.

The event hooks are called for every pipeline run, tracked or not, so deciding "is tracking
on?" must cost a few dictionary look-ups: MLflow itself (a second or more to import) is
imported only once this module says yes.

``DAMO_MLFLOW``          a tracking URI (``sqlite:///mlflow.db``, ``http://host:5000``, a
                         folder), or ``on``/``1``/``true`` (track to ``MLFLOW_TRACKING_URI``,
                         else MLflow's own default), or ``off``/``0``/``false`` (never track,
                         even with ``MLFLOW_TRACKING_URI`` set). ``damo-opt run --mlflow [URI]``
                         sets it for its process.
``MLFLOW_TRACKING_URI``  MLflow's own variable: set alone, it turns tracking on.
``MLFLOW_EXPERIMENT_NAME`` / ``MLFLOW_EXPERIMENT_ID``  where runs go (default experiment
                         ``damo-plugins``).
``DAMO_MLFLOW_PARENT_RUN_ID``  nest every pipeline run of this process under that run (set by
                         :func:`damo_mlflow.parent_run` for the processes it starts).
``DAMO_MLFLOW_LOG_MODELS=0``  log the reports but not the final model files (large models,
                         remote stores).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ENV = "DAMO_MLFLOW"
PARENT_ENV = "DAMO_MLFLOW_PARENT_RUN_ID"
MODELS_ENV = "DAMO_MLFLOW_LOG_MODELS"
DEFAULT_EXPERIMENT = "damo-plugins"

_ON = {"1", "on", "true", "yes", "default"}
_OFF = {"0", "off", "false", "no"}

#: MLflow's HTTP defaults (7 retries with exponential back-off, 120 s timeout) can keep a run
#: waiting for minutes on a server that is down; a tracker is a side concern, so unless the
#: user chose otherwise a dead server costs seconds, once (the tracker stops after a failure).
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


@dataclass(frozen=True)
class Settings:
    """Where one pipeline run is tracked."""

    #: tracking URI; ``None`` means MLflow's default
    uri: str | None
    experiment_name: str
    experiment_id: str | None
    parent_run_id: str | None
    log_models: bool

    def describe(self) -> str:
        """The store, as a user would recognise it in a warning."""
        return self.uri or "MLflow's default tracking store"


def from_env(environ: os._Environ[str] | dict[str, str] | None = None) -> Settings | None:
    """The tracking settings, or ``None`` when tracking is off (the default)."""
    env = os.environ if environ is None else environ
    damo = env.get(ENV, "").strip()
    mlflow_uri = env.get("MLFLOW_TRACKING_URI", "").strip() or None
    if damo.lower() in _OFF:
        return None
    if not damo:
        if mlflow_uri is None:
            return None
        uri: str | None = mlflow_uri
    elif damo.lower() in _ON:
        uri = mlflow_uri
    else:
        uri = damo
    return Settings(
        uri=uri,
        experiment_name=env.get("MLFLOW_EXPERIMENT_NAME", "").strip() or DEFAULT_EXPERIMENT,
        experiment_id=env.get("MLFLOW_EXPERIMENT_ID", "").strip() or None,
        parent_run_id=env.get(PARENT_ENV, "").strip() or None,
        log_models=env.get(MODELS_ENV, "1").strip().lower() not in _OFF,
    )


def enabled() -> bool:
    """Is tracking on for this process?"""
    return from_env() is not None
