"""Run reports: ``report.json`` (machine-readable) and ``report.md`` (for people)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from damo_plugins.core.io import atomic_path, write_text


def human(n: float | int | None, unit: str = "") -> str:
    """1234567 -> '1.23M'."""
    if n is None:
        return "—"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


def _num(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "—"


def _verification(v: Mapping[str, Any] | None) -> str:
    if not v:
        return "—"
    status = "ok" if v.get("passed") else "FAILED"
    parts = [status]
    if "tolerance" in v:  # a parity check: the numbers must not change
        parts.append(f"rel {v['max_rel']:.1e}, abs {v['max_abs']:.1e}")
    else:  # a pass that changes numbers on purpose (e.g. INT8): what it promises instead
        cos = v.get("cosine_min", v.get("cosine"))
        if isinstance(cos, (int, float)):
            parts.append(f"cos {cos:.4f}")
        agree = v.get("top_detection_agreement")
        if isinstance(agree, (int, float)):
            parts.append(f"top-det. {agree:.2f}")
    return ", ".join(parts)


def markdown(rep: Mapping[str, Any]) -> str:
    lines = [
        "# damo-plugins run report",
        "",
        f"- recipe: `{rep.get('recipe')}`",
        f"- model: `{rep.get('model')}`",
        f"- status: **{rep.get('status')}**",
    ]
    if rep.get("error"):
        lines.append(f"- error: {rep['error']}")
    lines += [
        "",
        "| # | step | format | precision | params | FLOPs | size | mAP | mAP@.5 | latency (ms) "
        "| verification | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in rep.get("steps", []):
        lat = latency_ms(s)
        ev = (s.get("metrics") or {}).get("evaluation") or {}
        lines.append(
            f"| {s['index']} | {s['step']} | {s['format']} | {s.get('precision') or '—'} | "
            f"{human(s.get('params'))} | "
            f"{human(s.get('flops'))} | {human(s.get('size_bytes'), 'B')} | "
            f"{_num(ev.get('mAP'), 4)} | {_num(ev.get('mAP50'), 4)} | {_num(lat, 2)} | "
            f"{_verification(s.get('verification'))} | {s['seconds']:.2f} |"
        )
    if rep.get("plot"):
        lines += ["", f"![params, FLOPs, size and latency per step]({rep['plot']})"]
    metric_rows = [
        (s["step"], k, v) for s in rep.get("steps", []) for k, v in (s.get("metrics") or {}).items()
    ]
    if metric_rows:
        lines += ["", "## Step metrics", "", "| step | metric | value |", "|---|---|---|"]
        for step, k, v in metric_rows:
            val = (
                f"{v:.4g}"
                if isinstance(v, float)
                else json.dumps(v)
                if isinstance(v, (dict, list))
                else str(v)
            )
            lines.append(f"| {step} | {k} | {val} |")
    return "\n".join(lines) + "\n"


def latency_ms(step: Mapping[str, Any]) -> float | None:
    """Median latency a benchmark step measured, if any."""
    bench = (step.get("metrics") or {}).get("benchmark") or {}
    value = bench.get("median_ms")
    return float(value) if isinstance(value, (int, float)) else None


def plot(out: Path, rep: dict[str, Any]) -> Path | None:
    """``report.png``: params, FLOPs, size on disk and latency per step (matplotlib, Agg)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are a convenience; the tables carry the numbers
        return None
    steps = rep.get("steps", [])
    if not steps:
        return None
    labels = [f"{s['index']}. {s['step']}" for s in steps]
    series = [
        ("params (M)", [(s.get("params") or 0) / 1e6 for s in steps]),
        ("FLOPs (G)", [(s.get("flops") or 0) / 1e9 for s in steps]),
        ("size on disk (MB)", [(s.get("size_bytes") or 0) / 1e6 for s in steps]),
        ("median latency (ms)", [latency_ms(s) or 0.0 for s in steps]),
    ]
    series = [(name, vals) for name, vals in series if any(vals)]
    fig, axes = plt.subplots(1, len(series), figsize=(3.2 * len(series), 3.4), squeeze=False)
    for ax, (name, vals) in zip(axes[0], series):
        ax.bar(range(len(vals)), vals, color="#3b7dd8")
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(len(vals)), labels, rotation=45, ha="right", fontsize=8)
    fig.suptitle(f"{rep.get('model')} — {rep.get('status')}", fontsize=10)
    fig.tight_layout()
    target = out / "report.png"
    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    rep["plot"] = target.name
    return target


def write(out: Path, rep: Mapping[str, Any]) -> None:
    write_text(out / "report.json", json.dumps(rep, indent=2, default=str) + "\n")
    write_text(out / "report.md", markdown(rep))
