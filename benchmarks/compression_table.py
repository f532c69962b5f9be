"""The seed article's compression table, reproduced on this machine with this project's passes.

    python benchmarks/compression_table.py --checkpoint PATH          # trained small model, mAP
    python benchmarks/compression_table.py --model damo-yolo-s --size 640 --no-map   # at scale

The article shows original / quantized / pruned / quantized+pruned with params, FLOPs, mAP
and latency (49.2 -> 48.1 mAP, 5.09 -> 1.95 ms). This script is a thin caller of
:mod:`damo_plugins.optimize`, not a second implementation: the rows are ``optimize``
candidates and the latency columns ``compare`` calls.

* ``optimize`` (space: fuse, one pruning fraction with the prune pass's importance, scope and
  iterative steps, each step followed by fine-tuning on the synthetic train split; INT8
  through NNCF, Intel Neural Compressor and ONNX Runtime; no accuracy control) builds every
  variant through the step runner, verifies each step, caches it under ``--work`` (a second
  run reuses it) and measures mAP on its held-out split of the synthetic val set;
* the table picks its rows from optimize's: **original** (as trained, FP32), **fused**
  (``reparam``), **distilled** (``--distilled``, fused; only if given), **pruned** (+ fused),
  **INT8** (NNCF on the fused model) and **pruned + INT8** per toolkit;
* ``compare`` times them, one call per column, each interleaving its models in rounds
  (speed-ups are medians of per-round ratios against the original in the same call):
  OpenVINO at f32 and at the CPU plugin's default precision for every row (ONNX Runtime's
  QDQ model runs in OpenVINO too, so ratios compare models, not runtimes), PyTorch eager for
  the FP32 rows, ONNX Runtime where there is an ONNX model.

Columns: parameters and FLOPs (counted on the PyTorch model a row comes from: quantization
keeps the operations), size on disk of the file that is benchmarked (OpenVINO ``.xml`` +
``.bin``, or the ``.onnx``), held-out mAP, latency per runtime.

The Markdown section is printed and written into ``docs/benchmarks/compression.md`` (one
section per model and size, so the two commands above fill one document), with a plot of
latency vs mAP (or latency per variant without mAP).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the shared helpers sit beside this script (on sys.path already when it runs as a script;
# a test that loads it by path needs it added)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    DOCS,
    command,
    log,
    machine,
    machine_line,
    packaged_checkpoint,
    parse_model_args,
    write_section,
)
from common import round_ratio as _round_ratio

from damo_plugins.core.artifact import load_model
from damo_plugins.core.errors import DamoError
from damo_plugins.core.report import human

DOC = DOCS / "compression.md"
PLOT = DOCS / "compression.png"
#: the goals of issue 7 (mAP in points of mAP@[.5:.95] x 100)
GOAL_INT8_SPEEDUP, GOAL_INT8_DROP = 2.0, 0.5
GOAL_BEST_SPEEDUP, GOAL_BEST_DROP, GOAL_BEST_SMALLER = 3.0, 1.0, 0.75
#: the seed article's table: params (M), FLOPs (G), mAP (%), latency (ms)
ARTICLE = [
    ("original", 28.6, 61.8, 49.2, 5.09),
    ("quantized", 7.2, 15.5, 48.8, 2.31),
    ("pruned", 22.9, 49.4, 48.9, 3.87),
    ("quantized + pruned", 5.8, 12.4, 48.1, 1.95),
]


# ------------------------------------------------------------------------------ rows
@dataclass
class Row:
    """One variant of the model: a row of ``optimize``'s table, re-timed by ``compare``."""

    key: str
    label: str
    path: Path  # what OpenVINO benchmarks (an IR, or ONNX Runtime's QDQ model)
    deploy_format: str
    torch_path: Path | None = None  # FP32 rows: the PyTorch model timed eagerly
    ort_path: Path | None = None  # an ONNX model timed in ONNX Runtime
    params: int | None = None
    flops: int | None = None
    size_bytes: int | None = None
    weights_bytes: int | None = None
    checkpoint_bytes: int | None = None
    mAP: float | None = None
    mAP50: float | None = None
    map_runtime: str = ""
    notes: list[str] = field(default_factory=list)


def _files_size(path: Path) -> tuple[int, int]:
    """(bytes of the model's files, bytes of its weights file) — an IR has ``.xml`` + ``.bin``."""
    if path.suffix == ".xml":
        xml, bin_ = path.stat().st_size, path.with_suffix(".bin").stat().st_size
        return xml + bin_, bin_
    size = path.stat().st_size
    return size, size


# -------------------------------------------------------------------------- building
def resolve_model(args: argparse.Namespace, work: Path) -> tuple[Path, str, int]:
    """The starting model as a file, where it came from, and its input size.

    A registered model with random weights is saved once under ``work`` so every step of
    ``optimize`` (and a resumed run) starts from the same weights.
    """
    model_args = parse_model_args(args.model_arg)
    shape = [1, 3, args.size, args.size] if args.size else None
    if args.checkpoint:
        art = load_model(args.checkpoint, input_shape=shape)
        path = Path(args.checkpoint)
        origin = f"checkpoint `{path.name}`"
    elif args.model:
        path = work / "input" / f"{args.model}-{args.size or 'default'}.pt"
        if path.is_file():
            art = load_model(path, input_shape=shape)
        else:
            art = load_model(args.model, input_shape=shape, model_args=model_args)
            art.save(path.parent, stem=path.stem)
        origin = "random weights (latency only)" if args.no_map else "random weights"
    else:
        packaged = packaged_checkpoint()
        if packaged is None:
            raise DamoError(
                "no trained checkpoint: the packaged demo model is not in this installation",
                "pass --checkpoint PATH (a damo-plugins .pt), or --model NAME for random weights",
            )
        art = load_model(packaged, input_shape=shape)
        path = packaged
        origin = f"packaged checkpoint `damo_plugins/assets/{packaged.name}`"
    if art.meta.get("mAP") is not None:
        origin += (
            f" (trained {art.meta.get('epoch')} epochs; mAP {art.meta['mAP']} on the first "
            "150 val images at training time)"
        )
    if not art.inputs or len(art.inputs[0].concrete()) != 4:
        raise DamoError("the model has no image input shape", "give --size N")
    if art.arch is None:
        raise DamoError(
            "the model has no architecture record (needed to prune and rebuild it)",
            "use a damo-plugins checkpoint or a registered model name",
        )
    origin = f"`{art.arch['builder']}` {art.arch.get('kwargs')}, {origin}"
    return path, origin, int(art.inputs[0].concrete()[-1])


def space(args: argparse.Namespace, bf16: bool) -> dict[str, Any]:
    """The table as an ``optimize`` space: fuse, one pruning fraction, INT8 per toolkit."""
    runtimes = ["openvino-f32", "onnxruntime"] + (["openvino-bf16"] if bf16 else [])
    return {
        "fuse": True,
        "prune": [args.prune_ratio],
        "prune_steps": args.prune_steps,
        "prune_importance": args.prune_importance,
        "prune_scope": args.prune_scope,
        "finetune_epochs": args.finetune_epochs,
        "quantizers": args.quantizers.split(","),
        "accuracy_control": False,  # the table shows plain INT8 per toolkit
        "runtimes": runtimes,
        "calibration": args.calib,
        "control": max(1, min(100, args.val_images)),
        "held_out": args.val_images,
        # optimize's own timing only ranks its candidates: the table's latency is compare's
        "rounds": 1,
        "slot_seconds": 0.05,
        "task_cpus": max(1, args.train_threads),
    }


def data_spec(args: argparse.Namespace, sp: dict[str, Any]) -> str:
    """The generated set (seed 0): train images for calibration and fine-tuning, val for the
    control and held-out splits (never trained on)."""
    train = max(args.calib, args.finetune_images if args.finetune_epochs else 0)
    return f"synthetic:{train},{sp['control'] + sp['held_out']}"


def _pick(rows: list[dict[str, Any]], what: str, runtime: str, precision: str = "f32") -> Any:
    """The optimize row named ``what · runtime precision`` (``what`` may end in a prefix)."""
    suffix = f" · {runtime} {precision}"
    found = [r for r in rows if r["name"].endswith(suffix) and r["name"].startswith(what)]
    exact = [r for r in found if r["name"] == what + suffix]
    return (exact or found or [None])[0]


def build_rows(
    args: argparse.Namespace, work: Path, model: Path, size: int, bf16: bool
) -> tuple[list[Row], dict[str, float], dict[str, Any]]:
    """Every variant, made and evaluated by ``damo_plugins.optimize``."""
    from damo_plugins.optimize import optimize

    sp = space(args, bf16)
    out = work / "optimize"
    res = optimize(
        str(model),
        data_spec(args, sp),
        imgsz=size,
        space=sp,
        output=out,
        resume=(out / "cache").is_dir(),
        no_accuracy=args.no_map,
        log=log,
    )
    rows = res.rows
    pct = f"{args.prune_ratio:.0%}"
    tuned = bool(args.finetune_epochs)
    pl = f"pruned {pct}" + (" + fine-tuned" if tuned else "")
    want = [
        ("original", "original (unfused FP32)", "original", "openvino"),
        ("fused", "fused (reparam) FP32", "fused", "openvino"),
        (
            "pruned",
            f"pruned {pct} + fine-tuned FP32" if tuned else f"pruned {pct} (no fine-tuning) FP32",
            pl,
            "openvino",
        ),
        ("int8", "INT8 (NNCF → OpenVINO)", "fused INT8 (nncf", "openvino"),
        ("pruned_int8", "pruned + INT8 (NNCF → OpenVINO)", f"{pl} INT8 (nncf", "openvino"),
        ("pruned_int8_inc", "pruned + INT8 (INC → OpenVINO)", f"{pl} INT8 (inc", "openvino"),
        (
            "pruned_int8_ort",
            "pruned + INT8 (ONNX Runtime QDQ)",
            f"{pl} INT8 (onnxruntime",
            "onnxruntime",
        ),
    ]
    asked = set(args.quantizers.split(","))
    want = [w for w in want if "INT8 (" not in w[2] or w[2].split("INT8 (")[1] in asked]
    if args.distilled:
        want.insert(2, ("distilled", "distilled (fused) FP32", "fused", "openvino"))
    made: list[Row] = []
    missing: list[str] = []
    for key, label, name, runtime in want:
        src = rows
        if key == "distilled":
            src = _distilled(args, work, size)
        r = _pick(src, name, runtime)
        if r is None and key in ("original", "fused", "pruned", "int8", "pruned_int8"):
            raise DamoError(  # the rows the goals are about
                f"optimize made no '{name} · {runtime}' row",
                "failures: " + ("; ".join(res.report["failed"]) or "see the log above"),
            )
        if r is None:  # one toolkit failed: the table says so and shows the others
            why = [f for f in res.report["failed"] if f.startswith(name.split(" INT8")[0])]
            missing.append(f"**{label}**: not made — " + ("; ".join(why) or "see the log"))
            continue
        row = Row(key, label, Path(r["path"]), "onnx" if runtime == "onnxruntime" else "openvino")
        if "quantize" not in r["chain"]:
            row.torch_path = Path(r["torch_path"]) if r["torch_path"] else None
            ort = _pick(src, name, "onnxruntime")
            row.ort_path = Path(ort["path"]) if ort else None
        elif runtime == "onnxruntime":
            row.ort_path = row.path
        row.params, row.flops = r["params"], r["flops"]
        row.size_bytes, row.weights_bytes = _files_size(row.path)
        if row.torch_path is not None:
            row.checkpoint_bytes = row.torch_path.stat().st_size
        row.mAP, row.mAP50 = r["mAP"], r["mAP50"]
        row.map_runtime = {"onnx": "ONNX Runtime", "openvino": "OpenVINO f32"}[row.deploy_format]
        row.notes += _notes(r, args)
        made.append(row)
    extra: dict[str, float] = {}
    for key, name in (("fused", "fused"), ("int8", "fused INT8 (nncf")):
        r = _pick(rows, name, "openvino", "bf16")
        if r is not None and r["mAP"] is not None:
            extra[f"{key}_default_mAP"] = r["mAP"]
    res.report["missing_rows"] = missing
    return made, extra, res.report


def _distilled(args: argparse.Namespace, work: Path, size: int) -> list[dict[str, Any]]:
    """The distilled checkpoint fused and deployed, by ``optimize`` too."""
    from damo_plugins.optimize import optimize

    sp = {**space(args, False), "prune": [], "quantizers": [], "runtimes": ["openvino-f32"]}
    out = work / "optimize-distilled"
    return optimize(
        args.distilled,
        data_spec(args, space(args, False)),
        imgsz=size,
        space=sp,
        output=out,
        resume=(out / "cache").is_dir(),
        no_accuracy=args.no_map,
        log=log,
    ).rows


def _notes(r: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """How a row was made, from the steps optimize recorded."""
    notes = []
    for st in r["steps"]:
        if st["step"] in ("export", "convert"):
            continue
        ver = st["verification"] or "not verified"
        m = st["metrics"]
        if st["step"] == "prune":
            pm = m.get("prune") or m
            notes.append(
                f"prune {ver}; importance {pm.get('importance')}, {args.prune_scope} ranking, "
                f"{args.prune_steps} step(s), {st['seconds']} s (fine-tuning "
                f"{args.finetune_epochs} epoch(s) per step, {args.train_threads} torch "
                f"thread(s)); mAP on the control split: {_pct(pm.get('mAP_before'))} before, "
                f"{_pct(pm.get('mAP_pruned'))} after pruning, {_pct(pm.get('mAP_finetuned'))} "
                "after fine-tuning"
            )
        elif st["step"] == "quantize":
            q = m.get("quantization") or {}
            kept = len(q.get("kept_fp") or [])
            notes.append(
                f"{st['label']}: {args.calib} calibration images, {kept} decode ops kept in FP, "
                f"{st['seconds']} s; INT8 check {ver}"
            )
        else:
            notes.append(f"{st['step']} {ver}")
    return notes


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}" if isinstance(value, (int, float)) else "—"


# ----------------------------------------------------------------------------- latency
def measure_latency(
    rows: list[Row], args: argparse.Namespace, size: int, bf16: bool
) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], list[float]]]:
    """Every row timed by ``compare``: OpenVINO f32 (and the CPU's default precision) for all
    rows, PyTorch eager for the FP32 rows, ONNX Runtime where there is an ONNX model. Each
    call interleaves its models in rounds; speed-ups are against the original in that call.
    """
    from damo_plugins.optimize import compare

    medians: dict[tuple[str, str], float] = {}
    per_round: dict[tuple[str, str], list[float]] = {}
    runs = [("ov_f32", "openvino", "f32", [(r.key, r.path) for r in rows])]
    if bf16:
        runs.append(("ov_default", "openvino", "default", [(r.key, r.path) for r in rows]))
    runs.append(("torch", "torch", "f32", [(r.key, r.torch_path) for r in rows if r.torch_path]))
    runs.append(("ort", "onnxruntime", "f32", [(r.key, r.ort_path) for r in rows if r.ort_path]))
    for name, runtime, precision, models in runs:
        if not models:
            continue
        log(f"latency: {name} ({len(models)} models, {args.rounds} interleaved rounds) ...")
        out = compare(
            [str(p) for _, p in models],
            None,
            runtime=runtime,
            precision=precision,
            imgsz=size,
            rounds=args.rounds,
            slot_seconds=args.slot_seconds,
            log=log,
        )
        for (key, _), r in zip(models, out):
            medians[(key, name)] = r["latency_ms"]
            per_round[(key, name)] = r["latency_rounds_ms"]
    return medians, per_round


def round_ratio(
    per_round: dict[tuple[str, str], list[float]], slow: tuple[str, str], fast: tuple[str, str]
) -> float | None:
    """Median over rounds of slow/fast (both measured in the same round); None if unmeasured."""
    if slow not in per_round or fast not in per_round:
        return None
    return _round_ratio(per_round[slow], per_round[fast])


# ------------------------------------------------------------------------------ report
def _ms(value: float | None) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "—"


def _mb(value: int | None) -> str:
    return f"{value / 1e6:.2f} MB" if isinstance(value, int) else "—"


def goals(rows: list[Row], per_round: dict, extra: dict[str, float]) -> list[str]:
    """The issue's goals, each with what was reached (both OpenVINO precisions)."""
    by = {r.key: r for r in rows}
    out = []

    def drop(a: str, b: str) -> float | None:
        if by[a].mAP is None or by[b].mAP is None:
            return None
        return 100 * (by[a].mAP - by[b].mAP)  # type: ignore[operator]

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("**reached**" if ok else "**not reached**")

    for prec, name in (("ov_f32", "f32"), ("ov_default", "OpenVINO's default precision")):
        s = round_ratio(per_round, ("fused", prec), ("int8", prec))
        if s is None:
            continue
        d = drop("fused", "int8")
        ok_s = s >= GOAL_INT8_SPEEDUP
        ok_d = None if d is None else d <= GOAL_INT8_DROP
        dtxt = "mAP not measured" if d is None else f"mAP drop {d:.2f} points"
        if prec == "ov_default" and "int8_default_mAP" in extra:
            dtxt += (
                f" (both run at the default precision: "
                f"{100 * (extra['fused_default_mAP'] - extra['int8_default_mAP']):.2f})"
            )
        out.append(
            f"- INT8 (NNCF → OpenVINO) vs fused FP32, both in OpenVINO at {name}: "
            f"**{s:.2f}x** faster (goal ≥ {GOAL_INT8_SPEEDUP:.0f}x: {verdict(ok_s)}), {dtxt} "
            f"(goal ≤ {GOAL_INT8_DROP}: {verdict(ok_d)})."
        )
    for prec, name in (("ov_f32", "f32"), ("ov_default", "OpenVINO's default precision")):
        s = round_ratio(per_round, ("original", prec), ("pruned_int8", prec))
        if s is None:
            continue
        d = drop("original", "pruned_int8")
        smaller = 1 - by["pruned_int8"].size_bytes / by["original"].size_bytes  # type: ignore[operator]
        ok_d = None if d is None else d <= GOAL_BEST_DROP
        dtxt = "mAP not measured" if d is None else f"mAP drop {d:.2f} points"
        line = (
            f"- pruned + INT8 (NNCF → OpenVINO) vs original, both in OpenVINO at {name}: "
            f"**{s:.2f}x** faster (goal ≥ {GOAL_BEST_SPEEDUP:.0f}x: "
            f"{verdict(s >= GOAL_BEST_SPEEDUP)}), {dtxt} (goal ≤ {GOAL_BEST_DROP}: "
            f"{verdict(ok_d)})"
        )
        if prec == "ov_f32":
            ckpt = by["original"].checkpoint_bytes
            wsm = 1 - by["pruned_int8"].weights_bytes / by["original"].weights_bytes  # type: ignore[operator]
            line += (
                f", **{smaller:.0%}** smaller on disk, IR vs IR (goal ≥ {GOAL_BEST_SMALLER:.0%}: "
                f"{verdict(smaller >= GOAL_BEST_SMALLER)}); weights file alone {wsm:.0%} smaller"
            )
            if ckpt:
                vs_ckpt = 1 - by["pruned_int8"].size_bytes / ckpt  # type: ignore[operator]
                line += f"; vs the original `.pt` checkpoint ({_mb(ckpt)}) {vs_ckpt:.0%} smaller"
        out.append(line + ".")
    return out


def markdown(
    key: str,
    rows: list[Row],
    medians: dict[tuple[str, str], float],
    per_round: dict[tuple[str, str], list[float]],
    notes: list[str],
    info: dict[str, Any],
    args: argparse.Namespace,
    argv: Sequence[str],
    extra: dict[str, float],
    plot_name: str | None,
    seconds: float,
) -> str:
    has_map = not args.no_map
    bf16 = not args.no_bf16
    default_prec = info.get("ov_cpu_default_precision", "?")
    orig = next(r for r in rows if r.key == "original")
    lines = [
        f"## {key}",
        "",
        f"Command (took {seconds / 60:.1f} min): `{command(__file__, argv)}`",
        "",
        machine_line(info, shared=False),
        "",
    ]
    head = ["variant", "params", "FLOPs", "size on disk"]
    if has_map:
        head += ["mAP@[.5:.95]", "mAP@.5", "ΔmAP"]
    head += ["OpenVINO ms (f32)", "speed-up"]
    if bf16:
        head += [f"OpenVINO ms ({default_prec} default)", "speed-up"]
    head += ["PyTorch eager ms", "ONNX Runtime ms"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.label, human(r.params), human(r.flops), _mb(r.size_bytes)]
        if has_map:
            dm = None if r.mAP is None or orig.mAP is None else 100 * (r.mAP - orig.mAP)
            cells += [_pct2(r.mAP), _pct2(r.mAP50), "—" if dm is None else f"{dm:+.2f}"]
        for prec in ("ov_f32",) + (("ov_default",) if bf16 else ()):
            s = round_ratio(per_round, ("original", prec), (r.key, prec))
            cells += [_ms(medians.get((r.key, prec))), "—" if s is None else f"{s:.2f}x"]
        cells += [_ms(medians.get((r.key, "torch"))), _ms(medians.get((r.key, "ort")))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Goals (issue 7):", "", *goals(rows, per_round, extra), ""]
    ort_fp = round_ratio(per_round, ("pruned", "ort"), ("pruned_int8_ort", "ort"))
    lines += ["How each row was made and measured:", ""]
    lines += [f"- {n}" for n in notes]
    for r in rows:
        bits = list(r.notes)
        if has_map and r.map_runtime:
            bits.append(f"mAP run in {r.map_runtime}")
        if r.checkpoint_bytes:
            bits.append(f"`.pt` checkpoint {_mb(r.checkpoint_bytes)}")
        if r.weights_bytes and r.deploy_format == "openvino":
            bits.append(f"IR weights file (`.bin`) {_mb(r.weights_bytes)}")
        if bits:
            lines.append(f"- **{r.label}**: " + "; ".join(bits) + ".")
    lines += [
        f"- Latency (`damo_plugins.optimize.compare`, one call per column): batch 1, "
        f"[1, 3, {info['size']}, {info['size']}] input, OpenVINO CPU plugin with the "
        "LATENCY hint and its default threads (all cores), PyTorch and ONNX Runtime with their "
        f"default threads; {args.rounds} interleaved rounds of ~{args.slot_seconds} s per "
        "variant; medians of all samples, speed-ups are medians of per-round ratios "
        "against the original in the same runtime and precision. **f32** columns compile with "
        "`INFERENCE_PRECISION_HINT=f32` (the adapter's default); the other OpenVINO column "
        f"leaves the CPU plugin's default ({default_prec} here), which also applies to the float "
        "parts of INT8 models.",
        "- Params and FLOPs are counted on the PyTorch model each row comes from (quantization "
        "keeps the operations; INT8 rows run the same convolutions in 8-bit). Size on disk is "
        "the benchmarked file: OpenVINO `.xml` + `.bin` (for small models the `.xml` graph "
        "description is a large share), or ONNX Runtime's `.onnx`.",
    ]
    if ort_fp is not None:
        lines.append(
            f"- ONNX Runtime, in its own runtime: its QDQ model is {ort_fp:.2f}x the speed of the "
            "pruned FP32 ONNX model (same export)."
        )
    if has_map:
        lines.append(
            f"- mAP: COCO mAP@[.5:.95] / mAP@.5 (×100) on optimize's held-out split: "
            f"{args.val_images} images of the synthetic val split (seed 0; never trained on, "
            "disjoint from the control split that fine-tuning was checked on), letterboxed "
            "to the input, "
            "DAMO's multi-class NMS (conf 0.05, IoU 0.7), pycocotools; ΔmAP in points vs the "
            "original."
        )
        if extra:
            lines.append(
                f"- mAP@[.5:.95] in OpenVINO at bf16 (the default precision here: "
                f"{default_prec}): fused "
                f"{_pct2(extra.get('fused_default_mAP'))}, INT8 {_pct2(extra.get('int8_default_mAP'))}."
            )
    lines.append(
        "- The machine is shared with other engineers' jobs: absolute milliseconds are noisy "
        "(±15 % or worse between runs); the ratios, measured side by side, are what to read."
    )
    if plot_name:
        lines += ["", f"![latency vs mAP per variant]({plot_name})"]
    return "\n".join(lines) + "\n"


def _pct2(value: float | None) -> str:
    return f"{100 * value:.2f}" if isinstance(value, (int, float)) else "—"


def plot(
    path: Path, rows: list[Row], medians: dict[tuple[str, str], float], has_map: bool, title: str
) -> Path | None:
    """Latency vs mAP (one point per variant), or latency per variant without mAP."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = plt.get_cmap("tab10")
    if has_map:
        for i, r in enumerate(rows):
            x, y = medians.get((r.key, "ov_f32")), r.mAP
            if x is None or y is None:
                continue
            ax.scatter([x], [100 * y], s=60, color=colours(i % 10), label=r.label, zorder=3)
            ax.annotate(r.key, (x, 100 * y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel("OpenVINO CPU latency, median ms (f32, batch 1)")
        ax.set_ylabel("mAP@[.5:.95] (×100)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    else:
        labels = [r.label for r in rows]
        for j, (prec, name) in enumerate((("ov_f32", "f32"), ("ov_default", "default"))):
            vals = [medians.get((r.key, prec)) or 0.0 for r in rows]
            if any(vals):
                ax.barh(
                    [i + 0.4 * j for i in range(len(rows))], vals, height=0.4, label=f"OV {name}"
                )
        ax.set_yticks([i + 0.2 for i in range(len(rows))], labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("OpenVINO CPU latency, median ms (batch 1)")
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


HEADER = """# The compression table, reproduced

The seed article's headline table (DAMO-YOLO, its own machine and model):

| variant | params (M) | FLOPs (G) | mAP (%) | latency (ms) |
|---|---|---|---|---|
{article}

Its claims: ~1.1 points of mAP lost, ~80 % smaller, 2.6x faster. Below, the same table made by
this project's passes on this machine (`benchmarks/compression_table.py`): first the trained
small model on the project's synthetic data (with mAP), then DAMO-YOLO-S at 640 px with random
weights (latency only, the real scale). Goals set in issue 7:

- INT8 (OpenVINO) vs fused FP32 (OpenVINO): ≥ {s1:.0f}x faster with ≤ {d1} mAP drop;
- pruned + INT8 vs original: ≥ {s2:.0f}x faster, ≤ {d2} mAP drop, ≥ {z:.0%} smaller on disk.

"""


def write_doc(path: Path, key: str, section: str) -> None:
    """Insert or replace this section; sections with mAP first, then by name."""
    article = "\n".join(f"| {n} | {p} | {f} | {m} | {ms} |" for n, p, f, m, ms in ARTICLE)
    header = HEADER.format(
        article=article,
        s1=GOAL_INT8_SPEEDUP,
        d1=GOAL_INT8_DROP,
        s2=GOAL_BEST_SPEEDUP,
        d2=GOAL_BEST_DROP,
        z=GOAL_BEST_SMALLER,
    )
    write_section(
        path,
        section,
        key=key,
        header=header,
        sort=lambda k, body: ("| mAP@[.5:.95] |" not in body, k),
    )


# ------------------------------------------------------------------- latency check
def latency_check(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Is optimize's latency the adapters benchmark's? The same IRs timed both ways.

    optimize times a candidate with ``measure.runner`` + ``measure.latency`` (one compiled
    request, calls filling a slot); ``benchmarks/bench_adapters.py`` with the OpenVINO
    adapter's ``benchmark`` (compiled per call, ``iterations`` sequential requests, all
    threads). Each round runs both methods on each model, order rotating; the figure is the
    median over rounds of the per-round ratio optimize / adapters.
    """
    import numpy as np

    from damo_plugins.core.manager import get_manager
    from damo_plugins.lib.timing import interleave
    from damo_plugins.optimize import measure, optimize

    t0 = time.perf_counter()
    work = Path(args.work) / "latency-check"
    model, origin, size = resolve_model(args, Path(args.work))
    sp = {
        "quantizers": ["nncf"],
        "runtimes": ["openvino-f32"],
        "calibration": args.calib,
        "control": 4,
        "held_out": 4,
        "rounds": 1,
        "slot_seconds": 0.05,
    }
    res = optimize(
        str(model),
        f"synthetic:{args.calib},8",
        imgsz=size,
        space=sp,
        output=work,
        resume=(work / "cache").is_dir(),
        no_accuracy=True,
        log=log,
    )
    mgr = get_manager()
    ov = mgr.get_adapter("openvino")
    feed = np.load(work / "cache" / "feed.npy")
    threads = os.cpu_count() or 2
    measures: dict[tuple[str, str], Any] = {}
    names = {"fused": "fused", "int8": "fused INT8 (nncf"}
    for key, name in names.items():
        art = load_model(_pick(res.rows, name, "openvino")["path"], manager=mgr)
        fn = measure.runner(art, "openvino", "f32", "CPU", mgr, feed)

        def opt_way(fn: Any = fn) -> float:
            lat = measure.latency({"m": fn}, rounds=1, slot_seconds=args.slot_seconds)
            return float(lat["m"]["median_ms"])

        def adapter_way(art: Any = art) -> float:
            return float(
                ov.benchmark(
                    art, "CPU", hint="latency", warmup=1, iterations=args.iters, threads=threads
                )["median_ms"]
            )

        measures[(key, "optimize")] = opt_way
        measures[(key, "adapters")] = adapter_way
    log(f"latency check: {args.rounds} interleaved rounds ...")
    got = interleave(measures, args.rounds)
    import statistics

    out: dict[str, Any] = {"rows": {}, "machine": machine()}
    lines = [
        "## optimize's latency vs the adapters benchmark's",
        "",
        f"Command (took {(time.perf_counter() - t0) / 60:.1f} min, a short run): "
        f"`{command(__file__, argv)}`",
        "",
        machine_line(out["machine"]),
        "",
        f"Model: {origin}, {size} px; its fused FP32 and NNCF INT8 IRs made by optimize. Each "
        f"of {args.rounds} rounds times each IR both ways, the order rotating: **optimize** "
        "(`measure.runner` + `measure.latency`, what it runs per candidate: one compiled "
        f"request, calls filling ~{args.slot_seconds} s) and **adapters** (the OpenVINO "
        f"adapter's `benchmark` as `benchmarks/bench_adapters.py` calls it: LATENCY hint, "
        f"{threads} threads, {args.iters} sequential requests after one warm-up). Medians of "
        "per-round medians; the ratio is the median of per-round ratios.",
        "",
        "| model | optimize ms | adapters ms | optimize / adapters | within 5 % |",
        "|---|---|---|---|---|",
    ]
    for key in names:
        a, b = got[(key, "optimize")], got[(key, "adapters")]
        ratio = statistics.median(x / y for x, y in zip(a, b))
        ok = abs(ratio - 1) <= 0.05
        out["rows"][key] = {"optimize": a, "adapters": b, "ratio": ratio, "ok": ok}
        lines.append(
            f"| {key} | {statistics.median(a):.2f} | {statistics.median(b):.2f} | "
            f"{ratio:.3f} | {'yes' if ok else '**no**'} |"
        )
    out["markdown"] = "\n".join(lines) + "\n"
    write_section(Path(args.check_doc), out["markdown"], key="latency-check")
    print(out["markdown"])
    return out


# -------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", help="damo-plugins .pt (default: the packaged trained model)")
    p.add_argument("--model", help="a registered model name, random weights (e.g. damo-yolo-s)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--size", type=int, help="input size (default: the checkpoint's)")
    p.add_argument("--no-map", action="store_true", help="latency only (random weights)")
    p.add_argument("--distilled", help="a distilled checkpoint of the same task (adds a row)")
    p.add_argument("--prune-ratio", type=float, default=0.3)
    p.add_argument(
        "--prune-importance",
        default="auto",
        choices=("auto", "l1", "l2", "bn", "taylor"),
        help="auto: taylor with fine-tuning data, else bn",
    )
    p.add_argument("--prune-scope", default="global", choices=("global", "uniform"))
    p.add_argument(
        "--prune-steps", type=int, default=3, help="iterative steps (fine-tuning after each)"
    )
    p.add_argument(
        "--finetune-epochs",
        type=int,
        default=1,
        help="fine-tuning epochs after each prune step (0: prune without fine-tuning)",
    )
    p.add_argument("--finetune-images", type=int, default=1200, help="train images to fine-tune on")
    p.add_argument("--train-threads", type=int, default=1, help="torch threads for fine-tuning")
    p.add_argument("--val-images", type=int, default=250, help="held-out val images for mAP")
    p.add_argument("--calib", type=int, default=128, help="calibration images (synthetic train)")
    p.add_argument(
        "--quantizers",
        default="nncf,inc,onnxruntime",
        help="INT8 toolkits, comma-separated (nncf is needed: the goals are about its rows)",
    )
    p.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    p.add_argument("--slot-seconds", type=float, default=0.4, help="time per variant per round")
    p.add_argument("--no-bf16", action="store_true", help="skip the default-precision column")
    p.add_argument(
        "--latency-check",
        action="store_true",
        help="instead of the table: time optimize's latency against the adapters benchmark's "
        "on the same IRs (writes a section of --check-doc)",
    )
    p.add_argument("--iters", type=int, default=4, help="--latency-check: adapter iterations")
    p.add_argument("--check-doc", default=str(DOCS / "optimize.md"))
    p.add_argument("--work", default="runs/compression_table", help="artifacts and data")
    p.add_argument("--doc", default=str(DOC), help="Markdown file to write the section into")
    p.add_argument("--plot", help="PNG path (default: next to --doc)")
    args = p.parse_args(argv)
    unknown = set(args.quantizers.split(",")) - {"nncf", "inc", "onnxruntime"}
    if unknown or "nncf" not in args.quantizers.split(","):
        p.error("--quantizers: nncf plus any of inc, onnxruntime")
    if args.no_map and args.model is None and args.checkpoint is None:
        args.model = "damo-yolo-s"
    if args.no_map:
        args.finetune_epochs = 0
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Build, measure, report; returns ``{"rows": [...], "markdown": ..., "doc": ...}``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    t_start = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.latency_check:
        return latency_check(args, argv)
    model, origin, size = resolve_model(args, work)  # first: a bad path fails before any work
    from damo_plugins.optimize.measure import precision_supported

    bf16 = not args.no_bf16 and precision_supported("CPU", "bf16")
    rows, extra, opt_report = build_rows(args, work, model, size, bf16=not args.no_map and bf16)
    notes = [f"Model: {origin}, input {size} px."]
    notes.append(
        f"Made by `damo_plugins.optimize` (its cache and report: `{work / 'optimize'}`): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in opt_report["seconds"].items())
        + "; every step verified by its pass."
    )
    notes += opt_report["missing_rows"]
    if not args.distilled:
        notes.append(
            "No **distilled** row: no distilled checkpoint was given (`--distilled PATH`); the "
            "`distill` pass makes one (see `docs/benchmarks/training.md`)."
        )
    arch = load_model(str(model), input_shape=[1, 3, size, size]).arch or {}
    key = f"{arch.get('builder', model.stem)}-{size}"
    log("latency (interleaved rounds, compare) ...")
    medians, per_round = measure_latency(rows, args, size, bf16=not args.no_bf16)
    doc = Path(args.doc)
    plot_path = Path(args.plot) if args.plot else None
    if plot_path is None:
        plot_path = (
            PLOT if doc == DOC and not args.no_map else doc.with_name(f"compression-{key}.png")
        )
    title = f"{key}: {'latency vs mAP' if not args.no_map else 'latency'} per variant"
    made = plot(plot_path, rows, medians, not args.no_map, title)
    info = {**machine(), "size": size}
    section = markdown(
        key,
        rows,
        medians,
        per_round,
        notes,
        info,
        args,
        argv,
        extra,
        os.path.relpath(made, doc.parent) if made else None,
        time.perf_counter() - t_start,
    )
    write_doc(doc, key, section)
    print(section)
    result = {
        "key": key,
        "markdown": section,
        "doc": str(doc),
        "plot": str(made) if made else None,
        "machine": info,
        "extra": extra,
        "optimize": str(work / "optimize" / "optimize.json"),
        "rows": [
            {
                "key": r.key,
                "label": r.label,
                "params": r.params,
                "flops": r.flops,
                "size_bytes": r.size_bytes,
                "mAP": r.mAP,
                "mAP50": r.mAP50,
                "latency_ms": {rt: ms for (k, rt), ms in medians.items() if k == r.key},
                "speedup_ov_f32": round_ratio(per_round, ("original", "ov_f32"), (r.key, "ov_f32")),
                "notes": r.notes,
            }
            for r in rows
        ],
    }
    (work / f"{key}.json").write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    try:
        main()
    except DamoError as exc:
        print(f"compression_table: error: {exc}", file=sys.stderr)
        sys.exit(2)
