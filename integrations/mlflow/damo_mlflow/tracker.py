"""Pipeline events -> MLflow runs.

One MLflow run per pipeline run:

* **params** — the recipe (model, input shape, seed, model arguments, step names), every
  step's validated configuration (defaults included, ``step.02.convert.to``), and the versions
  of Python, damo-plugins, every installed ``damo_plugins`` distribution and the backends
  (torch, onnx, onnxruntime, openvino, nncf, neural-compressor, ...);
* **metrics** — each step's report entry (params, FLOPs, size on disk, seconds, median latency,
  mAP, verification numbers), logged with the step's index as MLflow's ``step``, so one metric
  (``benchmark.median_ms``) is a series along the pipeline and its latest value is the final
  model's, which is what comparing runs needs;
* **artifacts** — ``recipe.json`` (as validated), ``report/report.{md,json,png}`` and the
  final model's files (``model/NN-step/``);
* **tags** — ``damo.status`` (ok / failed / interrupted, mirrored in the run's MLflow status),
  ``damo.output``, ``damo.model``, ``damo.recipe``, ``damo.error``, each step's verification
  message.

Nesting: a pipeline run becomes a *child* of an enclosing run when there is one — a pipeline
started while another runs in the same thread, MLflow's active run in this thread
(``mlflow.start_run()`` around the call), or ``DAMO_MLFLOW_PARENT_RUN_ID``. :func:`parent_run`
opens such a parent (what ``optimize`` does around its candidates) and sets the variable, so
candidate pipelines run in worker processes nest too.

Reliability: the tracker is a side concern. Any failure of MLflow (bad URI, server down,
deleted run, disk full) is reported **once** per run as a :class:`PluginWarning` naming this
integration; the rest of that run is not tracked and the pipeline goes on unchanged.

State is kept per thread (pipelines run synchronously in the thread that started them), so
concurrent pipelines in threads each get their own run.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import logging
import math
import os
import platform
import re
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from damo_mlflow.settings import HTTP_DEFAULTS, PARENT_ENV, Settings, from_env
from damo_plugins.core.errors import first_line
from damo_plugins.core.manager import PluginWarning
from damo_plugins.core.report import latency_ms

LABEL = "MLflow integration (damo-plugins-mlflow)"

#: distributions whose versions are logged when installed (the backends that shape results)
VERSIONED = (
    "damo-plugins",
    "torch",
    "torchvision",
    "numpy",
    "onnx",
    "onnxruntime",
    "openvino",
    "nncf",
    "neural-compressor",
    "ray",
    "mlflow",
)
#: report status -> MLflow run status
RUN_STATUS = {"ok": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}

# MLflow's limits (mlflow.utils.validation): longer values are refused, so they are cut.
MAX_KEY = 250
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 5000
BATCH = 100  # params (and tags) per log_batch call
_BAD_KEY_CHARS = re.compile(r"[^\w\-./ :]")


@dataclass
class _Run:
    """One tracked run: a pipeline's, or a parent opened by :func:`parent_run`."""

    settings: Settings | None
    client: Any = None
    run_id: str | None = None
    logged_steps: set[int] = field(default_factory=set)
    failed: bool = False

    @property
    def live(self) -> bool:
        return self.settings is not None and self.run_id is not None and not self.failed


_local = threading.local()


def _stack() -> list[_Run]:
    """This thread's pipeline runs, innermost last."""
    if not hasattr(_local, "runs"):
        _local.runs = []
    return _local.runs


@contextmanager
def _guard(run: _Run, what: str) -> Iterator[None]:
    """Turn an MLflow failure into one warning; later calls for this run then do nothing."""
    try:
        yield
    except Exception as exc:
        already = run.failed
        run.failed = True
        if not already:
            where = run.settings.describe() if run.settings else "?"
            warnings.warn(
                f"{LABEL}: {what} failed, this run is not tracked any further "
                f"(tracking store {where}): {type(exc).__name__}: {first_line(exc)}",
                PluginWarning,
                stacklevel=4,
            )


# ------------------------------------------------------------------ events
def pipeline_started(recipe: Any, output: str) -> None:
    """Open the pipeline's run (nested under an enclosing run if there is one)."""
    settings = from_env()
    enclosing = next((r for r in reversed(_stack()) if r.live), None)
    run = _Run(settings)
    # Pushed even when tracking is off or fails, so that pipeline_finished pops this run.
    _stack().append(run)
    if settings is None:
        return
    with _guard(run, "opening the MLflow run"):
        client = _client(settings)
        parent = _parent_id(settings, client, enclosing)
        experiment_id = _experiment_for(client, settings, parent)
        dump = _recipe_dict(recipe)
        tags = {
            "damo.output": str(Path(output).resolve()),
            "damo.model": str(dump.get("model", "")),
            "damo.status": "running",
        }
        if parent:
            tags["mlflow.parentRunId"] = parent
        created = client.create_run(
            experiment_id, run_name=Path(output).name or "damo", tags=_context_tags(tags)
        )
        run.client, run.run_id = client, created.info.run_id
        _log(run, params={**_recipe_params(dump), **version_params()})
        client.log_dict(run.run_id, dump, "recipe.json")


def step_finished(step: str, metrics: Mapping[str, Any]) -> None:
    """Log a finished step's configuration, numbers and verification."""
    stack = _stack()
    run = stack[-1] if stack else None
    if run is None or not run.live:
        return
    with _guard(run, f"logging step '{step}'"):
        _log_entry(run, metrics)


def pipeline_finished(report: Mapping[str, Any]) -> None:
    """Log what is left (input entry, a failed step), the reports, the model; close the run."""
    stack = _stack()
    run = stack.pop() if stack else None
    if run is None or not run.live:
        return
    with _guard(run, "closing the MLflow run"):
        for entry in report.get("steps") or []:
            if entry.get("index") not in run.logged_steps:
                _log_entry(run, entry)
        status = str(report.get("status", "failed"))
        tags = {"damo.status": status, "damo.recipe": str(report.get("recipe", ""))}
        if report.get("error"):
            tags["damo.error"] = str(report["error"])
        _log(run, tags=tags)
        out = Path(str(report.get("output", ".")))
        for name in ("report.md", "report.json", "report.png"):
            if (out / name).is_file():
                run.client.log_artifact(run.run_id, str(out / name), "report")
        if status == "ok" and run.settings is not None and run.settings.log_models:
            _log_model_files(run, out, report.get("steps") or [])
        run.client.set_terminated(run.run_id, RUN_STATUS.get(status, "FAILED"))


# -------------------------------------------------------------- parent runs
class ParentRun:
    """An open parent run: what an optimizer logs besides its candidates' nested runs."""

    def __init__(self, run: _Run) -> None:
        self._run = run

    @property
    def run_id(self) -> str | None:
        return self._run.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters (e.g. the search space); failures warn once, never raise."""
        if self._run.live:
            with _guard(self._run, "logging parameters"):
                _log(self._run, params={k: _text(v, MAX_PARAM_VALUE) for k, v in params.items()})

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        """Log the numeric leaves of ``metrics`` (nested mappings become ``a.b``) at ``step``."""
        if self._run.live:
            with _guard(self._run, "logging metrics"):
                values: dict[str, float] = {}
                _numbers("", metrics, values)
                _log(self._run, metrics=values, step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (e.g. the chosen candidate)."""
        if self._run.live:
            with _guard(self._run, "setting tags"):
                _log(self._run, tags={k: str(v) for k, v in tags.items()})


@contextmanager
def parent_run(
    name: str,
    *,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[ParentRun | None]:
    """Open an MLflow run under which every pipeline run inside the block is nested.

    This is the optimizer's entry point: open one parent for the search, run each candidate
    as an ordinary pipeline (in this process, threads or worker processes started inside the
    block, which inherit ``DAMO_MLFLOW_PARENT_RUN_ID``), log the outcome on the handle.
    Yields ``None`` when tracking is off or the store cannot be reached (one warning); the
    block runs either way. The run ends FINISHED, FAILED (the block raised) or KILLED
    (interrupted).
    """
    settings = from_env()
    if settings is None:
        yield None
        return
    run = _Run(settings)
    with _guard(run, "opening the parent MLflow run"):
        client = _client(settings)
        enclosing = next((r for r in reversed(_stack()) if r.live), None)
        parent = _parent_id(settings, client, enclosing)
        experiment_id = _experiment_for(client, settings, parent)
        all_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        created = client.create_run(experiment_id, run_name=name, tags=_context_tags(all_tags))
        run.client, run.run_id = client, created.info.run_id
        given = {k: _text(v, MAX_PARAM_VALUE) for k, v in (params or {}).items()}
        _log(run, params={**version_params(), **given})
    if not run.live:
        yield None
        return
    assert run.run_id is not None
    previous = os.environ.get(PARENT_ENV)
    os.environ[PARENT_ENV] = run.run_id
    status = "FAILED"
    try:
        yield ParentRun(run)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if previous is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = previous
        if run.live:
            with _guard(run, "closing the parent MLflow run"):
                run.client.set_terminated(run.run_id, status)


# ------------------------------------------------------------------ helpers
def _client(settings: Settings) -> Any:
    """An ``MlflowClient`` for the configured store (imports MLflow: tracking is on)."""
    for var, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(var, value)
    # Creating a SQLite store runs its schema migrations, which log INFO lines (MLflow's and
    # alembic's); a user tracking a run wants none of them on the console.
    for name in ("alembic", "mlflow.store.db.utils"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=settings.uri)


def _parent_id(settings: Settings, client: Any, enclosing: _Run | None) -> str | None:
    """The run to nest under: an enclosing pipeline's, MLflow's active run, or the env's."""
    if (
        enclosing is not None
        and enclosing.settings is not None
        and enclosing.settings.uri == settings.uri
    ):
        return enclosing.run_id
    mlflow = sys.modules.get("mlflow")  # imported by _client already when we get here
    if mlflow is not None:
        active = mlflow.active_run()
        if active is not None and mlflow.get_tracking_uri() == client.tracking_uri:
            return str(active.info.run_id)
    return settings.parent_run_id


def _experiment_for(client: Any, settings: Settings, parent: str | None) -> str:
    """A child run lives in its parent's experiment (the UI shows nesting only there)."""
    if parent:
        return str(client.get_run(parent).info.experiment_id)
    if settings.experiment_id:
        return settings.experiment_id
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(settings.experiment_name)
    if experiment is None:
        try:
            return str(client.create_experiment(settings.experiment_name))
        except MlflowException:  # created meanwhile by a concurrent run
            experiment = client.get_experiment_by_name(settings.experiment_name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise RuntimeError(
            f"experiment '{settings.experiment_name}' is deleted in this store; restore it "
            "or set MLFLOW_EXPERIMENT_NAME to another name"
        )
    return str(experiment.experiment_id)


def _context_tags(tags: dict[str, str]) -> dict[str, str]:
    """Add MLflow's usual context tags (user, source, git commit) where it can find them."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        return {str(k): str(v) for k, v in resolve_tags(tags).items()}
    except Exception:  # a context provider failing must not cost the run its tracking
        return tags


def _recipe_dict(recipe: Any) -> dict[str, Any]:
    if hasattr(recipe, "model_dump"):
        return dict(recipe.model_dump(mode="json"))
    if isinstance(recipe, Mapping):
        return json.loads(json.dumps(dict(recipe), default=str))
    return {"recipe": str(recipe)}


def _step_name(raw: Any) -> str:
    if isinstance(raw, Mapping) and len(raw) == 1:
        return str(next(iter(raw)))
    return str(raw)


def _recipe_params(dump: Mapping[str, Any]) -> dict[str, str]:
    """``recipe.<field>`` for scalar fields, ``recipe.<field>.<key>`` one level into mappings;
    the steps as their names (their validated configurations arrive with each step)."""
    out: dict[str, str] = {}
    for key, value in dump.items():
        if value is None:
            continue
        if key == "steps":
            out["recipe.steps"] = ", ".join(_step_name(s) for s in value) or "-"
        elif isinstance(value, Mapping):
            for sub, v in value.items():
                out[f"recipe.{key}.{sub}"] = _text(v, MAX_PARAM_VALUE)
        else:
            out[f"recipe.{key}"] = _text(value, MAX_PARAM_VALUE)
    return out


def version_params() -> dict[str, str]:
    """``version.<distribution>``: Python, the backends and every damo-plugins distribution."""
    out = {"version.python": platform.python_version()}
    for dist in VERSIONED:
        try:
            out[f"version.{dist}"] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    for ep in md.entry_points(group="damo_plugins"):
        dist = getattr(ep, "dist", None)
        if dist is not None:
            out[f"version.{dist.metadata['Name']}"] = dist.version
    return out


def _numbers(prefix: str, value: Any, out: dict[str, float]) -> None:
    """Collect the finite numeric leaves of nested mappings as ``a.b.c`` (booleans as 0/1)."""
    if isinstance(value, bool):
        out[prefix] = float(value)
    elif isinstance(value, (int, float)):
        if math.isfinite(value):
            out[prefix] = float(value)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _numbers(f"{prefix}.{k}" if prefix else str(k), v, out)


def entry_metrics(entry: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of one report entry, named as they are logged."""
    values: dict[str, float] = {}
    for key in ("params", "flops", "size_bytes", "seconds"):
        _numbers(key, entry.get(key), values)
    latency = latency_ms(entry)
    if latency is not None:
        values["latency_ms"] = latency
    _numbers("", entry.get("metrics") or {}, values)
    # A benchmark's verification repeats its measurements; keep only what is new.
    seen = {(k.rsplit(".", 1)[-1], v) for k, v in values.items()}
    checks: dict[str, float] = {}
    _numbers("verification", entry.get("verification") or {}, checks)
    for key, v in checks.items():
        if key == "verification.passed" or (key.rsplit(".", 1)[-1], v) not in seen:
            values[key] = v
    return values


def _log_entry(run: _Run, entry: Mapping[str, Any]) -> None:
    index = int(entry.get("index", 0))
    prefix = f"step.{index:02d}.{entry.get('step', '?')}"
    params = {
        f"{prefix}.{k}": _text(v, MAX_PARAM_VALUE) for k, v in (entry.get("config") or {}).items()
    }
    tags = {f"{prefix}.format": str(entry.get("format", ""))}
    verification = entry.get("verification") or {}
    if verification.get("message"):
        tags[f"{prefix}.verification"] = str(verification["message"])
    _log(run, params=params, metrics=entry_metrics(entry), tags=tags, step=index)
    run.logged_steps.add(index)


def _log(
    run: _Run,
    *,
    params: Mapping[str, str] | None = None,
    metrics: Mapping[str, float] | None = None,
    tags: Mapping[str, str] | None = None,
    step: int = 0,
) -> None:
    """``log_batch`` within MLflow's per-call limits, keys and values cut to its maxima."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    p = [Param(_key(k), v[:MAX_PARAM_VALUE]) for k, v in (params or {}).items()]
    m = [Metric(_key(k), v, now, step) for k, v in (metrics or {}).items()]
    t = [RunTag(_key(k), v[:MAX_TAG_VALUE]) for k, v in (tags or {}).items()]
    while p or m or t:
        run.client.log_batch(run.run_id, metrics=m[:BATCH], params=p[:BATCH], tags=t[:BATCH])
        p, m, t = p[BATCH:], m[BATCH:], t[BATCH:]


def _log_model_files(run: _Run, out: Path, steps: list[Mapping[str, Any]]) -> None:
    """The final model: its step folder when the run wrote it, else the file(s) themselves
    (a run of measuring steps on the user's own model must not upload the user's folder)."""
    artifact = steps[-1].get("artifact") if steps else None
    if not artifact:
        return
    path = Path(str(artifact))
    if not path.is_file():
        return
    folder = path.parent
    if folder.resolve().parent == out.resolve():
        run.client.log_artifacts(run.run_id, str(folder), f"model/{folder.name}")
        return
    files = [path]
    if path.suffix == ".xml":
        files.append(path.with_suffix(".bin"))
    files += sorted(folder.glob(path.name + ".*"))  # ONNX external data (model.onnx.data)
    for f in files:
        if f.is_file():
            run.client.log_artifact(run.run_id, str(f), "model")


def _key(key: str) -> str:
    return _BAD_KEY_CHARS.sub("_", key)[:MAX_KEY]


def _text(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:limit]
