"""``damo_plugins.optimize.optimize``: the Python API behind ``damo-opt optimize``.

Runs the :class:`~damo_plugins.optimize.engine.Optimizer` in a locked output folder
(:class:`~damo_plugins.core.output.OutputFolder`) and writes what the user reads:
``optimize.md`` (the Pareto table and how it was measured), ``optimize.json``, ``optimize.png``
(latency vs mAP), ``best/`` (the chosen model's deployable files) and ``best/recipe.yaml``
(its chain, for ``damo-opt run``).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from damo_plugins.core.errors import DamoError
from damo_plugins.core.io import write_text
from damo_plugins.core.manager import get_manager
from damo_plugins.core.output import OutputFolder
from damo_plugins.lib.executors import ExecutorError, open_executor, ray_address
from damo_plugins.optimize import measure
from damo_plugins.optimize.engine import (
    Candidate,
    Node,
    Optimizer,
    OptimizeResult,
    _OutOfTime,
    parse_duration,
)
from damo_plugins.optimize.space import Space, load_space


def optimize(
    model: str,
    data: str,
    *,
    device: str = "CPU",
    max_drop: float = 0.01,
    imgsz: int | None = None,
    time_budget: str | float | None = None,
    resume: bool = False,
    no_accuracy: bool = False,
    output: str | Path = "runs/optimize",
    space: str | Path | dict[str, Any] | Space | None = None,
    force: bool = False,
    seed: int = 0,
    log: Callable[[str], None] = print,
    workers: int | None = None,
    ray: str | None = None,
    device_resource: str | None = None,
) -> OptimizeResult:
    """Explore the candidate space; write the table, the best model and its recipe.

    ``max_drop`` is the largest allowed loss of mAP@[.5:.95] as a fraction (0.01 = one point)
    on the control split; ``space`` a space file or mapping (:class:`Space`).

    Where building and evaluating candidates runs: this process by default (``workers``
    ``None`` or 0), ``workers`` local processes, or Ray (``ray``: ``local``, ``auto`` or an
    address; ``DAMO_RAY_ADDRESS`` when not given). Latency is always timed one candidate at
    a time on the target device: this machine, or on Ray the node declaring the custom
    resource ``device_resource``.
    """
    if not 0 <= max_drop < 1:
        raise DamoError(f"--max-drop {max_drop} must be in [0, 1)", "e.g. 0.01 for one mAP point")
    sp = load_space(space)
    budget = parse_duration(time_budget)
    if workers is not None and workers < 0:
        raise DamoError(f"--workers {workers} must be 0 or more", "0 runs everything here")
    if device_resource and ray_address(ray) is None:
        raise DamoError(
            "--device-resource names a Ray node resource: it needs --ray (or DAMO_RAY_ADDRESS)",
            "without Ray, latency is timed on this machine",
        )
    out = Path(output)
    mgr = get_manager()
    t_start = time.perf_counter()
    with OutputFolder(out) as folder:
        inputs = [model] if Path(model).exists() else []
        if resume and (out / "cache").is_dir():
            foreign = folder.foreign()
            if foreign:
                raise DamoError(
                    f"output folder {out} holds files optimize did not write ({', '.join(foreign[:3])})",
                    "choose another -o",
                )
        else:
            try:
                folder.claim(force=force, inputs=inputs)
            except DamoError as exc:
                if "earlier run" in exc.message:
                    raise DamoError(
                        exc.message,
                        "use --resume to continue it, --force to start over, or another -o",
                    ) from None
                raise
        opt = Optimizer(
            model,
            data,
            output=out,
            folder=folder,
            device=device,
            max_drop=max_drop,
            imgsz=imgsz,
            time_budget=budget,
            no_accuracy=no_accuracy,
            space=sp,
            seed=seed,
            mgr=mgr,
            log=log,
            device_resource=device_resource,
        )
        opt.prepare()  # first: bad data or a bad device cost no cluster start
        with open_executor(ray, 0 if workers is None else workers) as executor:
            opt.executor = executor
            where = executor.describe()
            try:
                opt.run()
            except _OutOfTime as exc:
                opt.out_of_time = exc.message
                log(f"optimize: {exc.message}; reporting what was measured")
            except ExecutorError as exc:
                first = exc.hint.split("; ")[0] + "; " if exc.hint else ""
                raise DamoError(
                    exc.message,
                    f"{first}finished work is in the cache: rerun with --resume (with or "
                    "without --ray) to continue",
                ) from None
        out_of_time = opt.out_of_time
        rows = table_rows(opt)
        if not rows:
            raise DamoError(
                "no candidate could be measured" + (f" ({out_of_time})" if out_of_time else ""),
                "see the failures above; a larger --time-budget or a smaller space may help",
            )
        best = opt.choose()
        best_row = next((r for r in rows if best is not None and r["name"] == best.name), None)
        if best is not None:
            write_best(opt, best, folder)
        opt.seconds["total"] = time.perf_counter() - t_start
        report = {
            "model": model,
            "data": opt.source.describe(),
            "device": device,
            "max_drop": max_drop,
            "accuracy": opt.labelled,
            "split": {
                "calibration": len(opt.parts.calibration),
                "calibration_from": opt.parts.calibration_from,
                "control": len(opt.parts.control),
                "held_out": len(opt.parts.held_out),
            },
            "space": sp.model_dump(),
            "rows": rows,
            "best": best_row,
            "skipped": opt.skipped,
            "failed": opt.failed,
            "out_of_time": out_of_time,
            "cache": opt.stats,
            "executor": where,
            "timed_on": f"the Ray node with resource {device_resource}"
            if device_resource
            else "this machine (the driver)",
            "seconds": {k: round(v, 1) for k, v in opt.seconds.items()},
        }
        for name in ("optimize.json", "optimize.md"):
            folder.record(name)
        write_text(out / "optimize.json", json.dumps(report, indent=1, default=str) + "\n")
        plotted = plot(out / "optimize.png", rows, opt.labelled)
        if plotted:
            folder.record("optimize.png")
        write_text(out / "optimize.md", markdown(report, plotted is not None))
    if best_row is not None:
        log(
            f"best: {best_row['name']} — {best_row['latency_ms']:.2f} ms, "
            f"{best_row['speedup_original']:.2f}x vs the original"
            + (f", held-out mAP {best_row['mAP']:.4f}" if best_row.get("mAP") is not None else "")
        )
    else:
        log(f"no candidate is within --max-drop {max_drop} on the control split (see the table)")
    log(f"cache: {opt.stats['computed']} computed, {opt.stats['cached']} reused")
    return OptimizeResult(out, rows, best_row, report)


def table_rows(opt: Optimizer) -> list[dict[str, Any]]:
    """One row per measured candidate, sorted by latency, with the Pareto front marked."""
    ref_held = next(
        (
            c.result.get("held_out", {}).get("mAP")
            for c in opt.candidates
            if c.name == "original · openvino f32"
        ),
        None,
    )
    # one millisecond scale for all rows: the baseline's median over every candidate's
    # session, divided by the candidate's per-round speed-up (raw medians of candidates timed
    # minutes apart differ by the machine's load more than by the models)
    import statistics

    base = [c.result["baseline_ms"] for c in opt.candidates if c.result.get("ok")]
    ref_ms = statistics.median(base) if base else None
    rows = []
    for c in opt.candidates:
        r = c.result
        if not r.get("ok"):
            continue
        src = c.node.torch_source().info
        chain = [s for s, _ in c.node.chain()]
        held = r.get("held_out") or {}
        rows.append(
            {
                "name": c.name,
                "chain": chain,
                "runtime": c.runtime,
                # INT8 models run their float parts (the decode kept in FP) at the precision
                "precision": f"int8 + {c.precision}" if "quantize" in chain else c.precision,
                "params": src.get("params"),
                "flops": src.get("flops"),
                "size_bytes": measure.size_on_disk(opt.model_path(c)),
                "mAP": held.get("mAP"),
                "mAP50": held.get("mAP50"),
                "dmAP": None
                if held.get("mAP") is None or ref_held is None
                else held["mAP"] - ref_held,
                "control_mAP": (r.get("control") or {}).get("mAP"),
                "latency_ms": None if ref_ms is None else ref_ms / r["speedup_original"],
                "latency_ms_measured": r["latency_ms"],
                "speedup_original": r["speedup_original"],
                "speedup_default": r["speedup_default"],
                "cache_key": c.key,
                # where the files are, and how each step of the chain went (for callers
                # that re-measure or describe the rows, e.g. benchmarks/compression_table.py)
                "path": str(opt.model_path(c)),
                "torch_path": str(c.node.torch_source().path)
                if c.node.torch_source().format == "torch"
                else None,
                "steps": _chain_info(c.node),
            }
        )
    rows.sort(key=lambda row: -row["speedup_original"])
    best_map = -1.0
    for row in rows:  # sorted by latency: on the front when more accurate than every faster one
        m = row["mAP"] if row["mAP"] is not None else 0.0
        row["pareto"] = (row["mAP"] is None and row is rows[0]) or m > best_map
        best_map = max(best_map, m)
    return rows


def _chain_info(node: Node) -> list[dict[str, Any]]:
    """Step, verification, seconds and metrics of every node from the input to ``node``."""
    out: list[dict[str, Any]] = []
    n: Node | None = node
    while n is not None and n.step is not None:
        info = n.info or {}
        out.append(
            {
                "step": n.step,
                "label": n.label,
                "verification": info.get("verification"),
                "seconds": info.get("seconds"),
                "metrics": info.get("metrics") or {},
            }
        )
        n = n.parent
    return out[::-1]


def write_best(opt: Optimizer, best: Candidate, folder: OutputFolder) -> None:
    """The chosen model's files and a recipe reproducing its chain, in ``best/``."""
    import yaml

    src = opt.model_path(best)
    with folder.step_dir("best") as tmp:
        for f in measure.model_files(src):
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        recipe: dict[str, Any] = {
            "model": str(Path(opt.model_spec).resolve())
            if Path(opt.model_spec).exists()
            else opt.model_spec,
            "input_shape": list(opt.input.input_shape),
            "seed": opt.seed,
            "steps": [
                {name: dict(options)} if options else name for name, options in best.node.chain()
            ],
        }
        head = (
            f"# made by damo-opt optimize: {best.name}\n"
            f"# deploy on: {best.runtime}, precision {best.precision}, device {opt.device}"
            + (
                f" (OpenVINO: compile with INFERENCE_PRECISION_HINT={best.precision})\n"
                if best.runtime == "openvino"
                else "\n"
            )
            + "# reproduce: damo-opt run best/recipe.yaml -o OUT  (calibration and control data "
            "are the files under the optimize output's data/)\n"
        )
        write_text(tmp / "recipe.yaml", head + yaml.safe_dump(recipe, sort_keys=False))


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(value * scale, spec)


def markdown(rep: dict[str, Any], plotted: bool) -> str:
    from damo_plugins.core.report import human

    acc = rep["accuracy"]
    s = rep["split"]
    lines = [
        "# damo-opt optimize",
        "",
        f"Model `{rep['model']}`, data {rep['data']}, device {rep['device']}.",
        "",
    ]
    if acc:
        lines += [
            f"Data parts (disjoint): {s['calibration']} calibration images ({s['calibration_from']}); "
            f"a **control** split of {s['control']} val images for every decision (accuracy control, "
            f"choosing the best: within {rep['max_drop']} mAP@[.5:.95] of the original); a "
            f"**held-out** split of {s['held_out']} val images that no decision saw — every mAP "
            "in the table is the held-out split's.",
        ]
    else:
        lines += [
            "**Latency only** (`--no-accuracy`): no mAP was measured; the best is the fastest."
        ]
    head = ["", "candidate", "runtime", "precision", "params", "FLOPs", "size on disk"]
    if acc:
        head += ["mAP", "mAP@.5", "ΔmAP"]
    head += ["latency ms", "vs original (OV f32)", "vs OV default precision"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = (rep.get("best") or {}).get("name")
    for r in rep["rows"]:
        mark = ("**best** " if r["name"] == best else "") + ("◆" if r["pareto"] else "")
        cells = [
            mark,
            r["name"],
            r["runtime"],
            r["precision"],
            human(r["params"]),
            human(r["flops"]),
            _fmt(r["size_bytes"] and r["size_bytes"] / 1e6, ".2f") + " MB",
        ]
        if acc:
            cells += [
                _fmt(r["mAP"], ".2f", 100),
                _fmt(r["mAP50"], ".2f", 100),
                _fmt(r["dmAP"], "+.2f", 100),
            ]
        cells += [
            f"{r['latency_ms']:.2f}",
            f"{r['speedup_original']:.2f}x",
            f"{r['speedup_default']:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        (
            "◆ on the Pareto front (no faster candidate is more accurate). mAP = COCO "
            "mAP@[.5:.95] ×100, ΔmAP in points vs the original in OpenVINO f32. "
            if acc
            else "◆ the fastest (latency only: the front is one point). "
        )
        + "Params and FLOPs are counted on the "
        "PyTorch model a row comes from (INT8 keeps the operations). Latency: batch 1; each "
        "candidate timed in interleaved rounds with the original model in OpenVINO (f32 and "
        "OpenVINO's default precision); speed-ups are medians of per-round ratios, and "
        "candidates are ranked by them. *latency ms* puts every row on one scale: the "
        "original's median over all sessions divided by the row's speed-up (each row's raw "
        "median is `latency_ms_measured` in optimize.json).",
    ]
    if rep.get("best"):
        lines += ["", f"Best: **{rep['best']['name']}** — files and `recipe.yaml` in `best/`."]
    else:
        lines += [
            "",
            f"No candidate is within {rep['max_drop']} of the original on the control split.",
        ]
    for title, items in (("Skipped", rep["skipped"]), ("Failed", rep["failed"])):
        if items:
            lines += ["", f"{title}:", ""] + [f"- {x}" for x in items]
    if rep.get("out_of_time"):
        lines += ["", f"Stopped early: {rep['out_of_time']}."]
    secs = ", ".join(f"{k} {v:.0f} s" for k, v in rep["seconds"].items())
    lines += [
        "",
        f"Built and evaluated on: {rep['executor']}; latency timed on {rep['device']} of "
        f"{rep['timed_on']}, one candidate at a time after all other work.",
        "",
        f"Wall time: {secs}. Cache: {rep['cache']['computed']} computed, "
        f"{rep['cache']['cached']} reused.",
    ]
    if plotted:
        lines += ["", "![latency vs mAP](optimize.png)"]
    return "\n".join(lines) + "\n"


def plot(path: Path, rows: list[dict[str, Any]], has_map: bool) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    if has_map:
        xs = [r["latency_ms"] for r in rows]
        ys = [100 * (r["mAP"] or 0) for r in rows]
        ax.scatter(xs, ys, c=["tab:red" if r["pareto"] else "tab:blue" for r in rows], zorder=3)
        front = [r for r in rows if r["pareto"]]
        ax.plot(
            [r["latency_ms"] for r in front], [100 * (r["mAP"] or 0) for r in front], "r--", lw=1
        )
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r["name"], (x, y), fontsize=6, textcoords="offset points", xytext=(4, 3))
        ax.set_ylabel("held-out mAP@[.5:.95] (×100)")
    else:
        ax.barh(range(len(rows)), [r["latency_ms"] for r in rows])
        ax.set_yticks(range(len(rows)), [r["name"] for r in rows], fontsize=6)
        ax.invert_yaxis()
    ax.set_xlabel("latency, median ms (batch 1)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
