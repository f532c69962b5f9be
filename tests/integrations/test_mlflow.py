"""The MLflow integration against a real local tracking store (SQLite), read back with
``MlflowClient``: what a pipeline run logs, nesting under a parent run (optimize candidates,
in this process and in a ``damo-opt run --mlflow`` subprocess), a failing tracker, and
tracking being off by default without importing MLflow."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("damo_mlflow", reason="pip install -e integrations/mlflow --no-deps")
mlflow = pytest.importorskip("mlflow")

import damo_mlflow  # noqa: E402
from damo_mlflow import settings as mlflow_settings  # noqa: E402
from damo_plugins import __version__  # noqa: E402
from damo_plugins.core.errors import DamoError  # noqa: E402
from damo_plugins.core.hookspecs import hookimpl  # noqa: E402
from damo_plugins.core.manager import PluginManager, PluginWarning  # noqa: E402
from damo_plugins.core.pipeline import run  # noqa: E402
from tests.conftest import assert_clean_error, damo_opt  # noqa: E402

ENV_VARS = (
    "DAMO_MLFLOW",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_EXPERIMENT_ID",
    "DAMO_MLFLOW_PARENT_RUN_ID",
    "DAMO_MLFLOW_LOG_MODELS",
)
EXPORT_ONLY = {"model": "tiny-cnn", "steps": [{"export": {"opset": 17}}]}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module: creating its schema takes seconds, a run does not."""
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root / 'mlflow.db'}"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No tracking variables from the developer's shell; artifacts under tmp_path."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    return monkeypatch


@pytest.fixture
def tracked(clean_env: pytest.MonkeyPatch, store: str, request: pytest.FixtureRequest) -> str:
    """Tracking on, into an experiment of this test's own; returns the experiment name."""
    name = f"t-{request.node.name}"
    clean_env.setenv("DAMO_MLFLOW", store)
    clean_env.setenv("MLFLOW_EXPERIMENT_NAME", name)
    return name


def _client(store: str) -> Any:
    return mlflow.MlflowClient(tracking_uri=store)


def _runs(store: str, experiment: str) -> list[Any]:
    exp = _client(store).get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} was not created"
    return list(_client(store).search_runs([exp.experiment_id], order_by=["attributes.start_time"]))


def _artifacts(client: Any, run_id: str, path: str | None = None) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in client.list_artifacts(run_id, path):
        if f.is_dir:
            out.update(_artifacts(client, run_id, f.path))
        else:
            out[f.path] = f.file_size
    return out


def _mlflow_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [
        str(w.message)
        for w in record
        if issubclass(w.category, PluginWarning) and "MLflow integration" in str(w.message)
    ]


def _quiet(_: str) -> None:
    pass


# ------------------------------------------------------------------ logging a run
def test_pipeline_run_logs_params_metrics_artifacts(tracked: str, store: str, tmp_path: Path):
    out = tmp_path / "tiny"
    recipe = {
        "model": "tiny-cnn",
        "steps": [
            {"export": {"opset": 17}},
            {"convert": {"to": "openvino"}},
            {"benchmark": {"adapter": "openvino", "seconds": 0.3}},
        ],
    }
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        res = run(recipe, manager=PluginManager(), output=out, log=_quiet)
    assert res.report["status"] == "ok"
    assert _mlflow_warnings(record) == []

    (r,) = _runs(store, tracked)
    client = _client(store)
    steps = res.report["steps"]
    assert r.info.status == "FINISHED"
    assert r.info.run_name == "tiny"
    tags = r.data.tags
    assert tags["damo.status"] == "ok"
    assert tags["damo.output"] == str(out.resolve())
    assert tags["damo.model"] == "tiny-cnn"
    assert tags["step.02.convert.verification"] == steps[2]["verification"]["message"]
    assert "mlflow.parentRunId" not in tags

    params = r.data.params
    assert params["recipe.model"] == "tiny-cnn"
    assert params["recipe.steps"] == "export, convert, benchmark"
    # validated configurations, defaults included
    assert params["step.01.export.opset"] == "17"
    assert params["step.01.export.exporter"] == steps[1]["config"]["exporter"]
    assert params["step.02.convert.to"] == "openvino"
    assert params["step.03.benchmark.seconds"] == "0.3"
    assert params["version.damo-plugins"] == __version__
    assert params["version.damo-plugins-mlflow"] == md.version("damo-plugins-mlflow")
    for dist in ("torch", "onnxruntime", "openvino", "nncf", "mlflow"):
        assert params[f"version.{dist}"] == md.version(dist), dist

    # one series per number, indexed by the pipeline step; exact (MLflow stores doubles)
    history = {m.step: m.value for m in client.get_metric_history(r.info.run_id, "params")}
    assert history == {s["index"]: float(s["params"]) for s in steps}
    sizes = {m.step: m.value for m in client.get_metric_history(r.info.run_id, "size_bytes")}
    assert sizes == {s["index"]: float(s["size_bytes"]) for s in steps[1:]}
    flops = {m.step: m.value for m in client.get_metric_history(r.info.run_id, "flops")}
    assert flops[3] == float(steps[3]["flops"]) > 0
    bench = steps[3]["metrics"]["benchmark"]
    assert r.data.metrics["benchmark.median_ms"] == bench["median_ms"] > 0
    assert r.data.metrics["latency_ms"] == bench["median_ms"]
    assert r.data.metrics["benchmark.fps"] == bench["fps"]
    assert r.data.metrics["seconds"] == steps[3]["seconds"]
    passed = client.get_metric_history(r.info.run_id, "verification.passed")
    assert {m.step for m in passed} == {1, 2, 3} and all(m.value == 1.0 for m in passed)
    max_rel = {
        m.step: m.value for m in client.get_metric_history(r.info.run_id, "verification.max_rel")
    }
    assert max_rel[1] == steps[1]["verification"]["max_rel"]

    files = _artifacts(client, r.info.run_id)
    final = out / "02-convert"  # the benchmark step measured the converted model
    assert files["model/02-convert/model.xml"] == (final / "model.xml").stat().st_size
    assert files["model/02-convert/model.bin"] == (final / "model.bin").stat().st_size
    assert not any(p.startswith("model/01-export") for p in files)
    for name in ("report.md", "report.json"):
        assert files[f"report/{name}"] == (out / name).stat().st_size
    if res.report.get("plot"):
        assert files["report/report.png"] == (out / "report.png").stat().st_size
    logged = json.loads(
        Path(
            client.download_artifacts(r.info.run_id, "report/report.json", str(tmp_path))
        ).read_text()
    )
    assert logged == json.loads((out / "report.json").read_text())
    assert logged["status"] == "ok"
    recipe_json = json.loads(
        Path(client.download_artifacts(r.info.run_id, "recipe.json", str(tmp_path))).read_text()
    )
    assert recipe_json["model"] == "tiny-cnn" and len(recipe_json["steps"]) == 3


def test_failed_pipeline_is_a_failed_run(tracked: str, store: str, tmp_path: Path):
    """A step that raises: the run ends FAILED with the error, its entry is logged, the
    reports are there, no model files."""
    # tiny-cnn is a classifier: evaluating it as a detector fails at run time, after export
    recipe = {
        "model": "tiny-cnn",
        "steps": [{"export": {"opset": 17}}, {"evaluate": {"data": "synthetic", "images": 2}}],
    }
    with pytest.raises(DamoError, match=r"detector outputs|predicts 10 classes"):
        run(recipe, manager=PluginManager(), output=tmp_path / "bad", log=_quiet)
    (r,) = _runs(store, tracked)
    report = json.loads((tmp_path / "bad" / "report.json").read_text())
    assert report["status"] == "failed"
    assert r.info.status == "FAILED"
    assert r.data.tags["damo.status"] == "failed"
    assert r.data.tags["damo.error"] == report["error"][:5000]
    assert r.data.params["step.01.export.opset"] == "17"
    files = _artifacts(_client(store), r.info.run_id)
    assert "report/report.json" in files
    assert not any(p.startswith("model/") for p in files)


# --------------------------------------------------------------------- nesting
def test_candidates_nest_under_a_parent_run(tracked: str, store: str, tmp_path: Path):
    """What optimize does: one parent, each candidate an ordinary pipeline run nested under
    it — here two in this process and one as ``damo-opt run --mlflow URI`` in a child process
    (which finds its parent through the inherited environment)."""
    recipe_file = tmp_path / "cand.yaml"
    recipe_file.write_text(
        "model: tiny-cnn\nsteps:\n  - export: {opset: 17}\noutput: cand-cli\n", encoding="utf-8"
    )
    with damo_mlflow.parent_run("optimize", params={"candidates": 3}) as parent:
        assert parent is not None and parent.run_id
        assert os.environ["DAMO_MLFLOW_PARENT_RUN_ID"] == parent.run_id
        for i in range(2):
            run(EXPORT_ONLY, manager=PluginManager(), output=tmp_path / f"cand-{i}", log=_quiet)
        proc = damo_opt("run", str(recipe_file), "--mlflow", store, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        parent.log_metrics({"best": {"params": 1554}})
        parent.set_tags({"best": "cand-0"})
    assert "DAMO_MLFLOW_PARENT_RUN_ID" not in os.environ

    runs = {r.info.run_name: r for r in _runs(store, tracked)}
    assert set(runs) == {"optimize", "cand-0", "cand-1", "cand-cli"}
    top = runs["optimize"]
    assert top.info.status == "FINISHED"
    assert top.info.run_id == parent.run_id
    assert top.data.params["candidates"] == "3"
    assert top.data.metrics["best.params"] == 1554.0
    assert top.data.tags["best"] == "cand-0"
    for name in ("cand-0", "cand-1", "cand-cli"):
        child = runs[name]
        assert child.data.tags["mlflow.parentRunId"] == parent.run_id, name
        assert child.info.experiment_id == top.info.experiment_id
        assert child.info.status == "FINISHED"
    assert runs["cand-cli"].data.tags["damo.output"] == str((tmp_path / "cand-cli").resolve())


def test_nests_under_mlflows_active_run(clean_env: pytest.MonkeyPatch, store: str, tmp_path: Path):
    """``MLFLOW_TRACKING_URI`` alone turns tracking on; a pipeline run inside the user's own
    ``mlflow.start_run()`` becomes its child."""
    clean_env.setenv("MLFLOW_TRACKING_URI", store)
    clean_env.setenv("MLFLOW_EXPERIMENT_NAME", "t-active")
    assert mlflow.get_tracking_uri() == store
    with mlflow.start_run(run_name="mine") as outer:
        run(EXPORT_ONLY, manager=PluginManager(), output=tmp_path / "inner", log=_quiet)
        assert mlflow.active_run().info.run_id == outer.info.run_id  # left as it was
    runs = {r.info.run_name: r for r in _runs(store, "t-active")}
    assert runs["inner"].data.tags["mlflow.parentRunId"] == outer.info.run_id
    assert runs["inner"].info.status == "FINISHED"


# ------------------------------------------------------------ a failing tracker
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("kind", ["unknown scheme", "server down"])
def test_failing_tracker_warns_once_and_the_run_goes_on(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, kind: str
):
    uri = (
        "nosuchscheme://tracker"
        if kind == "unknown scheme"
        else f"http://127.0.0.1:{_closed_port()}"
    )
    clean_env.setenv("DAMO_MLFLOW", uri)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        res = run(EXPORT_ONLY, manager=PluginManager(), output=tmp_path / "out", log=_quiet)
    seconds = time.perf_counter() - t0
    assert res.report["status"] == "ok"
    assert (tmp_path / "out" / "01-export" / "model.onnx").is_file()
    found = _mlflow_warnings(record)
    assert len(found) == 1, found
    assert uri in found[0] and "not tracked" in found[0]
    # MLflow's own HTTP defaults would retry for minutes; ours cost seconds
    assert seconds < 60, seconds


def test_tracker_failing_mid_run_warns_once(tracked: str, store: str, tmp_path: Path):
    """MLflow raising in the middle of a run (the run was deleted by someone else): one
    warning, nothing more logged, the pipeline's result unchanged."""
    client = _client(store)

    class Deleter:
        """Deletes the tracked run once the first step is logged (the manager calls listeners
        in registration order: the integration, loaded from its entry point, comes first)."""

        done = False

        @hookimpl
        def damo_step_finished(self, step: str) -> None:
            if not self.done:
                (r,) = _runs(store, tracked)
                client.delete_run(r.info.run_id)
                self.done = True

    mgr = PluginManager()
    mgr.register(Deleter(), "deleter")
    recipe = {
        "model": "tiny-cnn",
        "steps": [{"export": {"opset": 17}}, {"convert": {"to": "openvino"}}],
    }
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        res = run(recipe, manager=mgr, output=tmp_path / "out", log=_quiet)
    assert res.report["status"] == "ok"
    found = _mlflow_warnings(record)
    assert len(found) == 1, found
    assert "logging step 'convert'" in found[0]
    run_id = _deleted_run_id(client, tracked)
    deleted = client.get_run(run_id)
    assert deleted.info.lifecycle_stage == "deleted"
    # step 1 was logged before the deletion; nothing after it (not even the input entry,
    # which is logged at the end, nor the final status)
    assert [m.step for m in client.get_metric_history(run_id, "params")] == [1]
    assert deleted.data.tags["damo.status"] == "running"


def _deleted_run_id(client: Any, experiment: str) -> str:
    from mlflow.entities import ViewType

    exp = client.get_experiment_by_name(experiment)
    (r,) = client.search_runs([exp.experiment_id], run_view_type=ViewType.DELETED_ONLY)
    return str(r.info.run_id)


# -------------------------------------------------------------- off by default
def test_settings_from_environment():
    assert mlflow_settings.from_env({}) is None
    assert mlflow_settings.from_env({"DAMO_MLFLOW": "  "}) is None
    s = mlflow_settings.from_env({"MLFLOW_TRACKING_URI": "sqlite:///a.db"})
    assert s is not None and s.uri == "sqlite:///a.db" and s.experiment_name == "damo-plugins"
    s = mlflow_settings.from_env({"DAMO_MLFLOW": "http://h:5000", "MLFLOW_TRACKING_URI": "x"})
    assert s is not None and s.uri == "http://h:5000"
    s = mlflow_settings.from_env({"DAMO_MLFLOW": "on", "MLFLOW_TRACKING_URI": "sqlite:///b.db"})
    assert s is not None and s.uri == "sqlite:///b.db"
    s = mlflow_settings.from_env({"DAMO_MLFLOW": "1"})
    assert s is not None and s.uri is None  # MLflow's own default store
    assert mlflow_settings.from_env({"DAMO_MLFLOW": "off", "MLFLOW_TRACKING_URI": "x"}) is None
    s = mlflow_settings.from_env({"DAMO_MLFLOW": "on", "DAMO_MLFLOW_LOG_MODELS": "0"})
    assert s is not None and not s.log_models


def test_off_by_default_and_mlflow_not_imported(tmp_path: Path):
    """Without DAMO_MLFLOW / MLFLOW_TRACKING_URI a pipeline run (with the integration loaded)
    imports no MLflow and writes no tracking store."""
    script = textwrap.dedent(
        """
        import sys
        from damo_plugins.core.manager import PluginManager
        from damo_plugins.core.pipeline import run
        mgr = PluginManager()
        assert "mlflow" in mgr.info, sorted(mgr.info)
        res = run({"model": "tiny-cnn", "steps": [{"export": {"opset": 17}}]},
                  manager=mgr, output="out", log=lambda s: None)
        assert res.report["status"] == "ok"
        print("mlflow imported:", "mlflow" in sys.modules)
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "mlflow imported: False" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bare_mlflow_option_before_the_recipe(tracked: str, store: str, tmp_path: Path):
    """``damo-opt run --mlflow recipe.yaml``: the option takes no URI (MLflow's own default,
    here MLFLOW_TRACKING_URI) and the recipe is still the recipe."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-cnn\nsteps:\n  - export: {opset: 17}\n", encoding="utf-8")
    env = {"DAMO_MLFLOW": None, "MLFLOW_TRACKING_URI": store, "MLFLOW_EXPERIMENT_NAME": tracked}
    proc = damo_opt("run", "--mlflow", str(recipe), "-o", "bare", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (r,) = _runs(store, tracked)
    assert r.info.run_name == "bare" and r.info.status == "FINISHED"


def test_mlflow_option_without_the_integration_is_an_error(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-cnn\nsteps:\n  - export: {opset: 17}\n", encoding="utf-8")
    proc = damo_opt(
        "run",
        str(recipe),
        "--mlflow",
        "sqlite:///x.db",
        env={"DAMO_PLUGINS_DISABLE": "mlflow"},
        cwd=tmp_path,
    )
    assert_clean_error(proc, "MLflow integration")
    assert not (tmp_path / "x.db").exists()


@pytest.fixture(autouse=True)
def _no_leftover_runs() -> Iterator[None]:
    """A test must not leave this thread's tracker stack or MLflow's active run behind."""
    yield
    from damo_mlflow import tracker

    assert tracker._stack() == []
    assert mlflow.active_run() is None
