"""Run reports: ``report.json`` (machine-readable) and ``report.md`` (for people)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from damo_plugins.io import write_text


def human(n: float | int | None, unit: str = "") -> str:
    """1234567 -> '1.23M'."""
    if n is None:
        return "—"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


def _verification(v: Mapping[str, Any] | None) -> str:
    if not v:
        return "—"
    status = "ok" if v.get("passed") else "FAILED"
    parts = [status]
    if "max_rel" in v:
        parts.append(f"rel {v['max_rel']:.1e}")
    if "max_abs" in v:
        parts.append(f"abs {v['max_abs']:.1e}")
    if "cosine" in v and "max_rel" not in v:
        parts.append(f"cos {v['cosine']:.4f}")
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
        "| # | step | format | params | FLOPs | verification | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in rep.get("steps", []):
        lines.append(
            f"| {s['index']} | {s['step']} | {s['format']} | {human(s.get('params'))} | "
            f"{human(s.get('flops'))} | {_verification(s.get('verification'))} | {s['seconds']:.2f} |"
        )
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


def write(out: Path, rep: Mapping[str, Any]) -> None:
    write_text(out / "report.json", json.dumps(rep, indent=2, default=str) + "\n")
    write_text(out / "report.md", markdown(rep))
