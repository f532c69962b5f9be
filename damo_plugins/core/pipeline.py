"""Run a recipe: load the model, apply each step, verify it, save it, report.

Guarantees (see ``docs/reliability.md``):

* the input model file is only read, never written;
* each step's artifact is written to a temporary folder and renamed to ``OUTPUT/NN-step/``
  only when complete, so a folder under its final name is always whole; a single-step
  verb's run (``flat=True``) moves the step's files into ``OUTPUT/`` itself instead, each
  recorded as the tool's own before it is moved;
* ``report.json``/``report.md`` are rewritten atomically after every step, so an interrupted
  run still says what it finished;
* a step that raises, or whose verification fails, stops the run with a clear message and
  leaves every earlier artifact in place; SIGTERM stops it like Ctrl-C (report
  "interrupted");
* the output folder is locked for the run and the tool touches only what it wrote there
  (:mod:`damo_plugins.core.output`): ``force`` replaces the tool's earlier outputs, never
  anything else, and a folder holding the run's input is refused.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from damo_plugins import __version__
from damo_plugins.core import report
from damo_plugins.core.artifact import ModelArtifact, _plain, load_model
from damo_plugins.core.errors import DamoError
from damo_plugins.core.io import write_text
from damo_plugins.core.manager import PluginManager, get_manager
from damo_plugins.core.output import OutputFolder
from damo_plugins.core.passes import PassContext
from damo_plugins.core.recipe import LoadedRecipe, check_chain, load_recipe
from damo_plugins.core.runner import run_step


@dataclass
class RunResult:
    artifact: ModelArtifact
    report: dict[str, Any]
    output: Path


def _resolve_model(spec: str, base: Path) -> str:
    """Recipe-relative file paths; builder names stay as they are (see
    :func:`damo_plugins.core.recipe.resolve_model_path`)."""
    from damo_plugins.core.recipe import resolve_model_path

    return resolve_model_path(spec, base)


def run(
    recipe: str | Path | Mapping[str, Any] | LoadedRecipe,
    *,
    manager: PluginManager | None = None,
    output: str | Path | None = None,
    verify: bool = True,
    force: bool = False,
    model: Any = None,
    log: Callable[[str], None] = print,
    flat: bool = False,
) -> RunResult:
    """Run ``recipe``; return the last artifact and the report.

    ``model`` overrides the recipe's model (a ``torch.nn.Module`` or artifact, for the
    Python API). ``output`` (``-o``) is taken as given; a recipe's own ``output`` is
    relative to the recipe file (the loader resolves it).

    ``flat`` is for single-step verbs (``damo-opt quantize -o DIR``): the one step's files
    land in ``DIR`` itself, beside the report, instead of ``DIR/01-step/`` — a user who
    typed ``-o DIR`` for one model expects the model there. The folder's ownership rules
    are the same (each file is recorded in the manifest before it is moved in; a file the
    tool did not write is never replaced). A recipe of several steps cannot be flat: their
    files would overwrite each other.
    """
    mgr = manager or get_manager()
    loaded = recipe if isinstance(recipe, LoadedRecipe) else load_recipe(recipe, mgr)
    r = loaded.recipe
    if flat and len(loaded.steps) != 1:
        raise DamoError(
            f"a flat output folder holds one step's files; this recipe has {len(loaded.steps)}",
            "run it without flat output (one NN-step/ folder per step)",
        )
    if model is None:
        check_chain(loaded)
    out = Path(output or r.output or Path("runs") / Path(loaded.source).stem)
    spec = model if model is not None else _resolve_model(r.model, loaded.base_dir)
    inputs = [spec] if isinstance(spec, str) and Path(spec).exists() else []
    if isinstance(model, ModelArtifact) and model.path is not None:
        inputs.append(model.path)  # a loaded file is still the run's input: never written to
    with OutputFolder(out) as folder, _sigterm_interrupts():
        folder.claim(force=force, inputs=inputs)
        return _run_steps(loaded, spec, model, folder, mgr, verify, log, flat)


def _run_steps(
    loaded: LoadedRecipe,
    spec: Any,
    model: Any,
    folder: OutputFolder,
    mgr: PluginManager,
    verify: bool,
    log: Callable[[str], None],
    flat: bool = False,
) -> RunResult:
    r, out = loaded.recipe, folder.path
    rep: dict[str, Any] = {
        "damo_plugins": __version__,
        "recipe": loaded.source,
        # a verb passing the artifact it loaded names it in the recipe; a module has no name
        "model": r.model
        if model is None or isinstance(model, ModelArtifact)
        else type(model).__name__,
        "output": str(out),
        "status": "running",
        "steps": [],
    }
    mgr.notify("damo_pipeline_started", recipe=r, output=str(out))
    try:
        t0 = time.perf_counter()
        art = load_model(
            spec, manager=mgr, input_shape=r.input_shape, model_args=r.model_args, arch=r.arch
        )
        first = _entry(0, "input", art, {}, None, time.perf_counter() - t0, None, {})
        first["size_bytes"] = _size(art.path) if art.path else None
        if first["flops"]:
            art.meta["flops"] = first["flops"]
        rep["steps"].append(first)
        _write_report(folder, rep)
        for step in loaded.steps:
            number = step.index + 1
            label = f"[{number}/{len(loaded.steps)}] {step.name}"
            log(f"{label} ...")
            pass_ = step.pass_cls(step.config)
            name = f"{number:02d}-{step.name}"
            # flat: the step's files go straight into the output folder (single-step verbs)
            final_dir = out if flat else out / name
            with folder.flat_dir(name) if flat else folder.step_dir(name) as tmp:
                ctx = PassContext(manager=mgr, workdir=tmp, seed=r.seed, verify=verify, log=log)
                res = run_step(pass_, art, ctx)
                after, ver, seconds, config = (
                    res.artifact,
                    res.verification,
                    res.seconds,
                    res.config,
                )
                if not res.passed:
                    rep["steps"].append(
                        _entry(number, step.name, after, config, ver, seconds, None, res.metrics)
                    )
                    res.raise_if_failed(
                        "earlier steps' outputs are kept; use --no-verify to skip checks"
                    )
                if pass_.measures_only and art.path is not None:
                    model_path = art.path  # unchanged model: no second copy on disk
                    write_text(
                        tmp / "metrics.json", json.dumps(_plain(res.metrics), indent=2) + "\n"
                    )
                else:
                    model_path = final_dir / after.save(tmp, manager=mgr).name
            entry = _entry(number, step.name, after, config, ver, seconds, model_path, res.metrics)
            entry["size_bytes"] = _size(model_path)
            if entry["flops"]:
                after.meta["flops"] = entry["flops"]
            rep["steps"].append(entry)
            after.path = model_path
            _write_report(folder, rep)
            mgr.notify("damo_step_finished", step=step.name, before=art, after=after, metrics=entry)
            log(f"{label} done in {seconds:.1f}s" + (f" — {ver.message}" if ver else ""))
            art = after
        rep["status"] = "ok"
        if report.plot(out, rep) is not None:
            folder.record("report.png")
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        rep["status"] = "interrupted" if interrupted else "failed"
        rep["error"] = (
            "interrupted"
            if interrupted
            else str(exc)
            if isinstance(exc, DamoError)
            else f"{type(exc).__name__}: {exc}"
        )
        if not isinstance(exc, (DamoError, KeyboardInterrupt)):
            rep["traceback"] = traceback.format_exc(limit=5)
        with contextlib.suppress(Exception):
            _write_report(folder, rep)
        mgr.notify("damo_pipeline_finished", report=rep)
        raise
    _write_report(folder, rep)
    mgr.notify("damo_pipeline_finished", report=rep)
    return RunResult(art, rep, out)


def _write_report(folder: OutputFolder, rep: dict[str, Any]) -> None:
    for name in ("report.json", "report.md"):
        folder.record(name)  # recorded first: a kill mid-write leaves only our own temp file
    report.write(folder.path, rep)


class Terminated(KeyboardInterrupt):
    """SIGTERM: stop like Ctrl-C (clean stop, report "interrupted", temp folders removed)."""


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` for the run (main thread only: signal handlers
    can only be set there; elsewhere the default behaviour stays)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _entry(
    index: int,
    name: str,
    art: ModelArtifact,
    config: dict[str, Any],
    ver: Any,
    seconds: float,
    path: Path | None,
    metrics: dict[str, Any],
) -> dict[str, Any]:
    return {
        "index": index,
        "step": name,
        "config": config,
        "format": art.format,
        # weights/arithmetic precision of the model (quantize sets it from the graph's own
        # quantize ops: an FP32 result of reverted quantization is never called int8)
        "precision": art.meta.get("precision", "fp32"),
        "params": art.param_count(),
        # ONNX/IR artifacts cannot be counted; they compute what the PyTorch model they came
        # from computes (format changes and quantization keep the operations), so inherit.
        "flops": art.flops() or art.meta.get("flops"),
        "verification": ver.to_dict() if ver is not None else None,
        "seconds": round(seconds, 3),
        "artifact": str(path) if path else (str(art.path) if art.path else None),
        "metrics": _plain(metrics),
    }


def _size(path: Path | None) -> int | None:
    """Bytes on disk of a step folder, or of a model file (with an IR's ``.bin``)."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    files = [p, p.with_suffix(".bin")] if p.suffix == ".xml" else [p]
    return sum(f.stat().st_size for f in files if f.is_file())
