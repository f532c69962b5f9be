"""Training, distillation and pruning of a small DAMO-YOLO on the generated data set.

    python benchmarks/bench_training.py all [--work runs/bench_training] [--epochs 6] ...
    python benchmarks/bench_training.py train|distill|prune|report ...   (one section)

Sections (each writes ``WORK/<section>.json``; ``report`` turns them into Markdown, prints it
and writes ``docs/benchmarks/training.md``):

* ``train``: the small model — ``damo-yolo-t`` at width 0.25 (``num_classes=6``), 256 px —
  trained on the seeded synthetic set (3000 train / 300 val images); time and COCO mAP on the
  whole validation split. ``--save-asset`` copies the best checkpoint to
  ``damo_plugins/assets/damo-yolo-nano-synth.pt`` with a JSON of its metadata.
* ``distill``: a smaller student (width 0.125) trained alone and trained with the ``train``
  model as teacher (CWD on the neck outputs), same schedule and seed; the gain in mAP.
* ``prune``: the ``train`` model pruned at 30 % and 50 % (L1, uniform) and fine-tuned;
  params, FLOPs, ONNX Runtime latency (interleaved rounds, medians) and mAP before pruning,
  after pruning and after fine-tuning.
* ``ablation``: the ``train`` model (or ``--teacher``) pruned to ``--ablation-flops`` of
  its FLOPs three ways, on the same seeds (``--seeds``): plain fine-tuning, fine-tuning with
  the unpruned model as teacher (``recovery: distill``), and the latter with per-block ratios
  from the sensitivity analysis (``allocation: sensitivity``); FLOPs and params actually
  removed, mAP before / right after pruning / after recovery, CPU minutes of recovery.

One torch thread by default: on a shared, oversubscribed 2-core machine two spinning
intra-op threads were ~20x slower than one. We report wall-clock and CPU time (the latter is
what the run costs on an idle core).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    DOCS,
    ROOT,
    apply_pass,
    command,
    interleaved_timing,
    machine_line,
    md_table,
    quiet,
    verdict,
    write_section,
)

from damo_plugins.core.artifact import load_model
from damo_plugins.core.manager import get_manager
from damo_plugins.data.evaluate import evaluate
from damo_plugins.data.synthetic import generate
from damo_plugins.train.distill import distill
from damo_plugins.train.loop import (
    FitResult,
    TrainConfig,
    fit,
    load_train_state,
    save_checkpoint,
)
from damo_plugins.train.trainer import data_splits

ASSET = ROOT / "damo_plugins" / "assets" / "damo-yolo-nano-synth"
SIZE = 256


def _data(args: argparse.Namespace) -> Path:
    root = Path(args.work) / "data"
    if not (root / "val.json").exists():
        print(f"generating {args.train_images}/{args.val_images} images in {root} ...", flush=True)
        generate(root, train=args.train_images, val=args.val_images, seed=args.seed)
    return root


def _build(width: float) -> Any:
    from damo_plugins.core.artifact import build_model

    mgr = get_manager()
    kwargs = {"num_classes": 6, "width": width}
    return build_model(
        "damo-yolo-t",
        mgr.get_model_builder("damo-yolo-t"),
        input_shape=[1, 3, SIZE, SIZE],
        model_args=kwargs,
    )


def _save(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def widen_state(
    small: dict[str, torch.Tensor], big: dict[str, torch.Tensor], noise: float, seed: int
) -> dict[str, torch.Tensor]:
    """``small``'s weights in a model whose every layer has the same or twice the channels.

    Function-preserving widening: channel ``j`` of a doubled layer is a copy of the small
    layer's channel ``j // 2`` (conv filters, BN statistics, biases), and a conv whose *input*
    doubled sees each input twice, so its weights are halved. ``j // 2`` survives concat,
    even-sized splits, residual adds and every per-channel op, so the wide model computes what
    the small one does (checked by evaluating it before training). Twin channels would get
    identical gradients forever; ``noise`` (relative to each conv weight's std) breaks the tie.
    Why: a wider model trained from scratch needs ~12 epochs at 6-7 CPU-min each on a shared
    2-core machine; starting from the trained narrow one starts at its mAP.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, target in big.items():
        value = small[key].clone()
        if value.shape == target.shape:
            out[key] = value
            continue
        if value.ndim != target.ndim:
            raise SystemExit(f"cannot widen {key}: {tuple(value.shape)} -> {tuple(target.shape)}")
        for dim, (a, b) in enumerate(zip(value.shape, target.shape)):
            if b == 2 * a:
                value = value.repeat_interleave(2, dim=dim)
                if dim == 1 and value.ndim >= 2:  # a doubled input: each seen twice
                    value = value / 2
            elif a != b:
                raise SystemExit(
                    f"cannot widen {key}: {tuple(small[key].shape)} -> {tuple(target.shape)}"
                )
        if value.is_floating_point() and value.ndim == 4 and noise > 0:
            value = value + torch.randn(value.shape, generator=gen) * value.std() * noise
        out[key] = value.to(target.dtype)
    return out


def _converged(history: list[dict[str, Any]], points: float = 0.5) -> bool:
    """Whether validation mAP rose by less than ``points`` mAP points over the last 2 epochs."""
    maps = [h["mAP"] for h in history if h.get("mAP") is not None]
    return len(maps) >= 3 and (maps[-1] - maps[-3]) * 100 < points


def section_train(args: argparse.Namespace) -> None:
    root = _data(args)
    train_set, val_set = data_splits(root, SIZE, seed=args.seed)
    out = Path(args.work) / "train"
    torch.manual_seed(args.seed)
    art = _build(args.width)
    if args.widen_from and not args.resume and not args.adopt:
        small = load_model(args.widen_from).model.state_dict()
        art.model.load_state_dict(
            widen_state(small, art.model.state_dict(), args.widen_noise, args.seed)
        )
        start = evaluate(art.model.eval(), val_set)
        print(f"widened {args.widen_from}: val mAP {start['mAP']:.4f} before training", flush=True)
    elif args.init and not args.resume and not args.adopt:
        # a warm restart: the same architecture's weights, a new warm-up and cosine cycle
        art.model.load_state_dict(load_model(args.init).model.state_dict())
        start = evaluate(art.model.eval(), val_set)
        print(f"from {args.init}: val mAP {start['mAP']:.4f} before training", flush=True)
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch,
        lr=args.lr,
        seed=args.seed,
        eval_limit=150,
        log_every=50,
        max_minutes=args.max_minutes,
        warmup_iters=args.warmup_iters,
    )
    if args.adopt:
        # a run made earlier with these same settings (e.g. by `damo-opt train`): measure it
        out = Path(args.adopt)
        hist = json.loads((out / "history.json").read_text())
        res = FitResult(
            art.model,
            hist,
            seconds=sum(h["seconds"] for h in hist),
            cpu_seconds=sum(h.get("cpu_seconds", 0.0) for h in hist),
            iterations=hist[-1]["iterations"],
        )
    else:
        # --resume: continue an interrupted run from its last epoch end (same settings)
        state = load_train_state(out / "last.pt") if args.resume else None
        res = fit(
            art.model, train_set, cfg, val_set=val_set, output=out, arch=art.arch, resume=state
        )
    best = load_model(out / "best.pt")
    metrics = evaluate(best.model, val_set)
    result = {
        "model": f"damo-yolo-t width {args.width}",
        "params": best.param_count(),
        "flops": best.flops(),
        "epochs_done": res.history[-1]["epoch"],
        "iterations": res.iterations,
        # from the per-epoch record, so a resumed run counts every epoch, not this process's
        "wall_min": round(sum(h.get("seconds", 0.0) for h in res.history) / 60, 1),
        "cpu_min": round(sum(h.get("cpu_seconds", 0.0) for h in res.history) / 60, 1),
        "converged": _converged(res.history),
        "mAP": round(metrics["mAP"], 4),
        "mAP50": round(metrics["mAP50"], 4),
        "history": res.history,
        "command": command(__file__, args.argv),
    }
    previous = Path(args.work) / "train.json"
    if args.adopt and previous.exists():  # keep the command that actually trained the model
        result["command"] = json.loads(previous.read_text()).get("command", result["command"])
    _save(Path(args.work) / "train.json", result)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}), flush=True)
    if args.save_asset:
        asset = ASSET.with_name(args.asset)
        asset.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "best.pt", asset.with_suffix(".pt"))
        info = {
            "file": asset.with_suffix(".pt").name,
            "builder": "damo-yolo-t",
            "kwargs": {"num_classes": 6, "width": args.width},
            "input_shape": [1, 3, SIZE, SIZE],
            "classes": list(train_set.class_names),
            "preprocessing": "RGB, float 0-255, resize longer side to 256, pad bottom/right with 0",
            "data": f"synthetic shapes, seed {args.seed}, {args.train_images} train / "
            f"{args.val_images} val images",
            "val_mAP": result["mAP"],
            "val_mAP50": result["mAP50"],
            "train": {
                **{
                    k: result[k]
                    for k in ("epochs_done", "iterations", "wall_min", "cpu_min", "converged")
                },
                "batch": args.batch,
                "lr": args.lr,
                "init": f"widened from {Path(args.widen_from).name}"
                if args.widen_from
                else f"continued from {Path(args.init).name}"
                if args.init
                else "scratch",
                "val_mAP_per_epoch": [round(h.get("mAP", float("nan")), 4) for h in res.history],
            },
            "command": result["command"],
        }
        earlier = Path(args.init).with_suffix(".json") if args.init else None
        if earlier is not None and earlier.is_file():  # keep the lineage: what trained the init
            before = json.loads(earlier.read_text())
            info["train"]["before"] = {k: before.get(k) for k in ("val_mAP", "train", "command")}
        _save(asset.with_suffix(".json"), info)
        print(f"saved {asset.with_suffix('.pt')}", flush=True)


def _teacher(args: argparse.Namespace) -> Any:
    path = Path(args.teacher) if args.teacher else Path(args.work) / "train" / "best.pt"
    if not path.exists():
        raise SystemExit(f"no trained model at {path}: run the 'train' section first")
    return load_model(path)


def section_distill(args: argparse.Namespace) -> None:
    root = _data(args)
    train_set, val_set = data_splits(root, SIZE, seed=args.seed)
    modes = args.distill_modes.split(",")
    teacher = _teacher(args).model.eval() if modes != ["alone"] else None
    cfg = TrainConfig(
        epochs=args.student_epochs,
        batch_size=args.batch,
        lr=args.lr,
        seed=args.seed,
        eval_every=10**6,
        log_every=50,
    )
    previous = Path(args.work) / "distill.json"
    # sections may run one mode at a time (e.g. 'alone' in parallel with 'train'): merge
    runs: dict[str, Any] = json.loads(previous.read_text())["runs"] if previous.exists() else {}
    for mode in modes:
        torch.manual_seed(args.seed)
        student = _build(args.student_width).model
        t0, c0 = time.perf_counter(), time.process_time()
        if mode == "alone":
            model = fit(student, train_set, cfg).model
        else:
            model = distill(student, teacher, train_set, cfg, loss=mode)[0]
        m = evaluate(model, val_set)
        runs[mode] = {
            "mAP": round(m["mAP"], 4),
            "mAP50": round(m["mAP50"], 4),
            "wall_min": round((time.perf_counter() - t0) / 60, 1),
            "cpu_min": round((time.process_time() - c0) / 60, 1),
        }
        print(mode, runs[mode], flush=True)
    result = {
        "teacher_mAP": round(evaluate(teacher, val_set)["mAP"], 4) if teacher is not None else None,
        "student": f"damo-yolo-t width {args.student_width}",
        "student_params": sum(p.numel() for p in _build(args.student_width).model.parameters()),
        "epochs": args.student_epochs,
        "runs": runs,
        "command": command(__file__, args.argv),
    }
    _save(Path(args.work) / "distill.json", result)


def _ort_latency(models: dict[str, Any], rounds: int, work: Path) -> dict[str, dict[str, float]]:
    """ONNX Runtime latency (1 thread) of each model's export, in interleaved rounds; the
    speed-up of each against the first is the median of per-round CPU-time ratios."""
    from damo_plugins.core.onnx_utils import ort_session

    mgr = get_manager()
    x = np.random.default_rng(0).uniform(0, 255, (1, 3, SIZE, SIZE)).astype(np.float32)
    runs = {}
    for k, a in models.items():
        onnx_art = apply_pass(mgr, "export", {}, a, work, log=quiet).raise_if_failed().artifact
        sess = ort_session(onnx_art.model, threads=1)
        runs[k] = lambda sess=sess: sess.run(None, {"images": x})
    times = interleaved_timing(runs, rounds)
    base = next(iter(models))
    return {
        n: {
            "wall_ms": round(times.median(n, "wall"), 2),
            "cpu_ms": round(times.median(n, "cpu"), 2),
            "speedup_cpu": round(times.ratio(base, n, "cpu"), 2),
        }
        for n in models
    }


def section_prune(args: argparse.Namespace) -> None:
    root = _data(args)
    base = _teacher(args)
    ctx_log = lambda s: print(s, flush=True)  # noqa: E731
    rows: dict[str, Any] = {}
    models = {"original": base}
    for variant in args.prune_variants.split(","):
        importance, scope = variant.split(":")
        for ratio in (float(r) for r in args.prune_ratios.split(",")):
            name = f"{importance} {scope} {int(ratio * 100)}%"
            cfg = {
                "ratio": ratio,
                "importance": importance,
                "scope": scope,
                "steps": args.prune_steps,
                "finetune_epochs": args.finetune_epochs,
                "lr": args.finetune_lr,
                "batch_size": args.batch,
                "data": str(root),
            }
            res = apply_pass(get_manager(), "prune", cfg, base, Path(args.work), log=ctx_log)
            out = res.artifact
            rows[name] = {**res.metrics, "wall_min": round(res.seconds / 60, 1)}
            models[name] = out
            save_checkpoint(
                Path(args.work) / f"pruned-{importance}-{scope}-{int(ratio * 100)}.pt",
                out.model,
                out.arch,
                [1, 3, SIZE, SIZE],
                {"prune": res.metrics},
            )
            print(name, res.metrics, f"check {verdict(res)}", flush=True)
    latency = _ort_latency(models, args.rounds, Path(args.work))
    _save(
        Path(args.work) / "prune.json",
        {
            "rows": rows,
            "latency": latency,
            "epochs": args.finetune_epochs,
            "steps": args.prune_steps,
            "command": command(__file__, args.argv),
        },
    )


#: the ablation's rows: (label, prune options that differ); everything else is shared
ABLATION = (
    ("fine-tuning", {"recovery": "finetune", "allocation": "uniform"}),
    ("distillation", {"recovery": "distill", "allocation": "uniform"}),
    ("distillation + sensitivity", {"recovery": "distill", "allocation": "sensitivity"}),
)
#: ``--ablation-arms`` names of the rows above
ARMS = {"finetune": 0, "distill": 1, "distill+sensitivity": 2}


def section_ablation(args: argparse.Namespace) -> None:
    """Recovery ablation: same base model, FLOPs target, steps, epochs and seeds per row."""
    root = _data(args)
    size = args.ablation_size
    base = load_model(
        Path(args.teacher) if args.teacher else Path(args.work) / "train" / "best.pt",
        input_shape=[1, 3, size, size],
    )
    out = Path(args.work) / "ablation.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    runs: dict[str, Any] = previous.get("runs", {}) if args.ablation_merge else {}
    try:
        arms = [ABLATION[ARMS[a]] for a in args.ablation_arms.split(",")]
    except KeyError as exc:
        raise SystemExit(f"--ablation-arms: unknown arm {exc}; use {', '.join(ARMS)}") from None
    for seed in (int(x) for x in args.seeds.split(",")):
        for label, options in arms:
            cfg = {
                "flops": args.ablation_flops,
                "steps": args.prune_steps,
                "finetune_epochs": args.finetune_epochs,
                "lr": args.ablation_lr,
                "batch_size": args.batch,
                "data": str(root),
                "img_size": size,
                "eval_limit": args.ablation_eval,
                "sensitivity_images": args.sensitivity_images,
                "cache_dir": str(Path(args.work) / "sensitivity-cache"),
                "recovery_iters": args.recovery_iters,
                **options,
            }
            t0 = time.perf_counter()
            res = apply_pass(
                get_manager(), "prune", cfg, base, Path(args.work), log=quiet, seed=seed
            )
            m = res.metrics
            row = {
                "seed": seed,
                "label": label,
                **{
                    k: m.get(k)
                    for k in (
                        "flops_removed",
                        "params_removed",
                        "mAP_before",
                        "mAP_pruned",
                        "mAP_recovered",
                        "recovery_cpu_seconds",
                        "recovery_seconds",
                    )
                },
                "sensitivity_cached": (m.get("sensitivity") or {}).get("cached"),
                "wall_min": round((time.perf_counter() - t0) / 60, 2),
                "check": verdict(res),
                "steps": args.prune_steps,
                "epochs": args.finetune_epochs,
                "flops_target": args.ablation_flops,
                "size": size,
                "eval_images": args.ablation_eval,
                "command": command(__file__, args.argv),
            }
            runs[f"{label} / seed {seed}"] = row
            # one file per row as soon as it is done: runs of other arms or seeds can go on
            # in parallel into the same WORK, and a stopped run keeps its finished rows
            slug = label.replace(" + ", "+").replace(" ", "-")
            _save(
                Path(args.work) / "ablation" / f"{slug}-e{args.finetune_epochs}-s{seed}.json", row
            )
            print(json.dumps(row), flush=True)
    _save(out, {"runs": runs, **_ablation_meta(args)})


def _ablation_meta(args: argparse.Namespace) -> dict[str, Any]:
    """What every row of an ablation shares (its command line's settings)."""
    return {
        "flops": args.ablation_flops,
        "steps": args.prune_steps,
        "epochs": args.finetune_epochs,
        "recovery_iters": args.recovery_iters,
        "size": args.ablation_size,
        "eval_images": args.ablation_eval,
        "command": command(__file__, args.argv),
    }


def _ablation_report(a: dict[str, Any]) -> list[str]:
    def pct(x: float | None) -> str:
        return "—" if x is None else f"{x:.1%}"

    def num(x: float | None) -> str:
        return "—" if x is None else f"{x:.3f}"

    order = [label for label, _ in ABLATION]
    runs = sorted(
        a["runs"].values(),
        key=lambda r: (r.get("epochs", a["epochs"]), order.index(r["label"]), r["seed"]),
    )
    rows = [
        [
            r["label"],
            f"{r.get('steps', a['steps'])} x {r.get('epochs', a['epochs'])}",
            r["seed"],
            pct(r["flops_removed"]),
            pct(r["params_removed"]),
            num(r["mAP_before"]),
            num(r["mAP_pruned"]),
            num(r["mAP_recovered"]),
            "—"
            if r["mAP_recovered"] is None or r["mAP_before"] is None
            else f"{(r['mAP_recovered'] - r['mAP_before']) * 100:+.1f}",
            "—" if r["recovery_cpu_seconds"] is None else f"{r['recovery_cpu_seconds'] / 60:.1f}",
        ]
        for r in runs
    ]
    iters = (
        f", at most {a['recovery_iters']} iterations per epoch" if a.get("recovery_iters") else ""
    )
    commands = sorted({r["command"] for r in runs if r.get("command")}) or [a.get("command")]
    return [
        "### Pruning recovery ablation",
        "",
        "Made by: " + "; ".join(f"`{c}`" for c in commands if c),
        "",
        f"Target: {a['flops']:.0%} of the FLOPs removed in the steps shown, each step "
        f"recovered by the epochs shown{iters}; {a['size']} px; mAP on "
        + (f"the first {a['eval_images']}" if a["eval_images"] else "all")
        + " val images (the control split). Same seeds per row.",
        "",
        *md_table(
            [
                "recovery",
                "steps x epochs",
                "seed",
                "FLOPs removed",
                "params removed",
                "mAP before",
                "mAP pruned",
                "mAP recovered",
                "ΔmAP (points)",
                "recovery CPU min",
            ],
            rows,
        ),
        "",
    ]


def _fmt_m(x: float | None) -> str:
    return "—" if x is None else f"{x / 1e6:.2f} M"


def _fmt_g(x: float | None) -> str:
    return "—" if x is None else f"{x / 1e9:.3f} G"


def _made_by(section: dict[str, Any]) -> list[str]:
    """The command a section's JSON records, as a line of the report."""
    return [f"Made by: `{section['command']}`", ""] if section.get("command") else []


def section_report(args: argparse.Namespace) -> str:
    work = Path(args.work)
    lines = [
        "## Training, distillation and pruning (generated data set)",
        "",
        f"Command: `{command(__file__, args.argv)}` (sections: train, distill, prune, report; "
        "each section below says which command made it). Wall-clock times are inflated and "
        "noisy on a shared machine; CPU time (one torch thread) is what the work costs on an "
        "idle core.",
        "",
        machine_line(),
        "",
        "Data: `damo_plugins.data.synthetic.generate(seed=0)`, 3000 train / 300 val images "
        "(256–320 px, 6 shape classes, clutter, noise). mAP = COCO mAP@[.5:.95] (pycocotools) on "
        "all 300 val images, input 256 px.",
        "",
    ]
    if (work / "train.json").exists():
        t = json.loads((work / "train.json").read_text())
        head = ["model", "params", "FLOPs (256 px)", "epochs (iterations, batch 16)", "wall"]
        row = [
            t["model"],
            _fmt_m(t["params"]),
            _fmt_g(t["flops"]),
            f"{t['epochs_done']} ({t['iterations']})",
            f"{t['wall_min']} min",
            f"{t['cpu_min'] or '—'} min",
            f"{t['mAP']:.3f}",
            f"{t['mAP50']:.3f}",
        ]
        lines += [
            "### Small model",
            "",
            *_made_by(t),
            *md_table([*head, "CPU", "mAP", "mAP@.5"], [row]),
            "",
            "Per epoch (validation on the first 150 images, EMA weights): "
            + ", ".join(f"{h['epoch']}: {h.get('mAP', float('nan')):.3f}" for h in t["history"]),
            "",
        ]
    if (work / "distill.json").exists():
        d = json.loads((work / "distill.json").read_text())
        runs = d["runs"]
        labels = {"alone": "alone", "cwd": "with teacher, CWD", "mse": "with teacher, MSE"}
        lines += [
            "### Distillation",
            "",
            *_made_by(d),
            f"Student {d['student']} ({_fmt_m(d['student_params'])} params), {d['epochs']} epochs, "
            f"same seed and schedule; teacher = the small model above (mAP {d['teacher_mAP']}).",
            "",
            *md_table(
                ["student trained", "mAP", "mAP@.5", "wall", "CPU"],
                [
                    [
                        labels.get(mode, mode),
                        f"{r['mAP']:.3f}",
                        f"{r['mAP50']:.3f}",
                        f"{r['wall_min']} min",
                        f"{r['cpu_min']} min",
                    ]
                    for mode, r in runs.items()
                ],
            ),
        ]
        if "alone" in runs:
            for mode in runs:
                if mode != "alone":
                    gain = runs[mode]["mAP"] - runs["alone"]["mAP"]
                    lines.append(f"\nGain ({mode}): **{gain * 100:+.1f} mAP points**.")
        lines.append("")
    if (work / "prune.json").exists():
        p = json.loads((work / "prune.json").read_text())
        lat = p["latency"]
        first = next(iter(p["rows"].values()))
        rows = [
            [
                "original",
                0,
                _fmt_m(first["params_before"]),
                _fmt_g(first["flops_before"]),
                lat["original"]["cpu_ms"],
                "1.00x",
                f"{first.get('mAP_before', 0):.3f}",
                "—",
                "—",
            ]
        ]
        rows += [
            [
                name,
                f"{r['channels_removed']:.1%}",
                _fmt_m(r["params_after"]),
                _fmt_g(r["flops_after"]),
                lat[name]["cpu_ms"],
                f"{lat[name]['speedup_cpu']:.2f}x",
                "—",
                f"{r.get('mAP_pruned', 0):.3f}",
                f"{r.get('mAP_finetuned', float('nan')):.3f}",
            ]
            for name, r in p["rows"].items()
        ]
        head = ["model", "channels removed", "params", "FLOPs", "ORT latency (CPU ms)"]
        lines += [
            "### Structured pruning",
            "",
            *_made_by(p),
            f"Each row: importance and ranking as named, {p.get('steps', 1)} iterative step(s), "
            f"each followed by {p['epochs']} fine-tuning epoch(s) (AdamW, EMA; Taylor = "
            "detection-loss gradients on 64 training images before each step). "
            "Latency: ONNX Runtime, 1 thread, batch 1, 256 px, interleaved rounds, medians; "
            "speed-up = median of per-round CPU-time ratios.",
            "",
            *md_table([*head, "speed-up", "mAP", "mAP pruned", "mAP fine-tuned"], rows),
            "",
        ]
    ablation = (
        json.loads((work / "ablation.json").read_text())
        if (work / "ablation.json").exists()
        else None
    )
    rows = [json.loads(f.read_text()) for f in sorted((work / "ablation").glob("*.json"))]
    if rows:  # the per-row files (all arms, seeds and epochs run into this WORK)
        first = rows[0]
        ablation = {
            **(ablation or _ablation_meta(args)),
            "flops": first.get("flops_target", args.ablation_flops),
            "size": first.get("size", args.ablation_size),
            "eval_images": first.get("eval_images"),
            "runs": {str(i): r for i, r in enumerate(rows)},
        }
    if ablation is not None:
        lines += _ablation_report(ablation)
    text = "\n".join(lines) + "\n"
    write_section(args.doc, text)
    print(text)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("section", choices=("all", "train", "distill", "prune", "ablation", "report"))
    ap.add_argument("--work", default="runs/bench_training")
    ap.add_argument("--train-images", type=int, default=3000)
    ap.add_argument("--val-images", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--teacher", help="trained checkpoint (default: WORK/train/best.pt)")
    ap.add_argument("--student-width", type=float, default=0.125)
    ap.add_argument("--student-epochs", type=int, default=3)
    ap.add_argument("--distill-modes", default="alone,cwd")
    ap.add_argument("--finetune-epochs", type=int, default=1, help="after each prune step")
    ap.add_argument(
        "--prune-variants",
        default="taylor:global,l1:uniform",
        help="comma-separated IMPORTANCE:SCOPE pairs, each pruned at every ratio",
    )
    ap.add_argument("--prune-ratios", default="0.3,0.5")
    ap.add_argument("--prune-steps", type=int, default=3)
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--ablation-flops", type=float, default=0.3, help="fraction of FLOPs removed")
    ap.add_argument("--ablation-size", type=int, default=SIZE, help="ablation input size")
    ap.add_argument("--ablation-eval", type=int, default=None, help="control images (mAP)")
    ap.add_argument("--ablation-merge", action="store_true", help="keep earlier ablation rows")
    ap.add_argument("--sensitivity-images", type=int, default=64)
    ap.add_argument("--recovery-iters", type=int, default=None, help="cap per epoch (smoke)")
    ap.add_argument("--seeds", default="0,1", help="ablation seeds")
    ap.add_argument(
        "--ablation-arms", default=",".join(ARMS), help=f"ablation rows, of {', '.join(ARMS)}"
    )
    ap.add_argument("--ablation-lr", type=float, default=2e-4, help="recovery learning rate")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save-asset", action="store_true")
    ap.add_argument("--adopt", help="train: measure this finished run folder instead of training")
    ap.add_argument("--resume", action="store_true", help="train: continue WORK/train/last.pt")
    ap.add_argument(
        "--widen-from", help="train: start from this narrower checkpoint, channels duplicated"
    )
    ap.add_argument(
        "--init", help="train: continue this checkpoint (same width; new warm-up and cycle)"
    )
    ap.add_argument(
        "--asset", default=ASSET.name, help="train --save-asset: file stem in damo_plugins/assets"
    )
    ap.add_argument("--warmup-iters", type=int, default=300, help="train: linear warm-up")
    ap.add_argument("--widen-noise", type=float, default=0.01, help="train: see widen_state")
    ap.add_argument("--doc", default=str(DOCS / "training.md"), help="report: Markdown to write")
    args = ap.parse_args(argv)
    args.argv = argv
    torch.set_num_threads(args.threads)
    sections = ["train", "distill", "prune", "report"] if args.section == "all" else [args.section]
    for s in sections:
        globals()[f"section_{s}"](args)


if __name__ == "__main__":
    main()
