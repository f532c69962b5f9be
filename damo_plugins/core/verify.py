"""Comparing model outputs: the numbers every verification reports."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np


@dataclass
class Verification:
    """Outcome of a step's check. ``metrics`` go into the report as they are."""

    passed: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "message": self.message, **self.metrics}


def compare_outputs(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]
) -> dict[str, float]:
    """Max absolute error, max error relative to the reference's scale, and cosine similarity.

    The relative error divides by the largest magnitude of each reference output (not
    element-wise), so outputs near zero do not blow it up. Non-finite values are errors.
    """
    import numpy as np

    if len(reference) != len(candidate):
        return {
            "max_abs": float("inf"),
            "max_rel": float("inf"),
            "cosine": 0.0,
            "outputs_mismatch": float(abs(len(reference) - len(candidate))),
        }
    max_abs = max_rel = 0.0
    cos_min = 1.0
    for ref, out in zip(reference, candidate):
        ref = np.asarray(ref, dtype=np.float64)
        out = np.asarray(out, dtype=np.float64)
        if ref.shape != out.shape:
            return {"max_abs": float("inf"), "max_rel": float("inf"), "cosine": 0.0}
        if ref.size == 0:
            continue
        if not np.all(np.isfinite(out)) and np.all(np.isfinite(ref)):
            return {"max_abs": float("inf"), "max_rel": float("inf"), "cosine": 0.0}
        diff = float(np.max(np.abs(ref - out)))
        scale = max(float(np.max(np.abs(ref))), 1e-12)
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / scale)
        a, b = ref.ravel(), out.ravel()
        denom = float(np.linalg.norm(a) * np.linalg.norm(b))
        cos = float(a @ b / denom) if denom > 0 else (1.0 if diff == 0 else 0.0)
        cos_min = min(cos_min, cos)
    return {"max_abs": max_abs, "max_rel": max_rel, "cosine": cos_min}


def parity(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], rel_tol: float
) -> Verification:
    """Pass when every output is within ``rel_tol`` of the reference's scale."""
    m = compare_outputs(reference, candidate)
    ok = m["max_rel"] <= rel_tol
    msg = (
        f"max rel. error {m['max_rel']:.2e} (tolerance {rel_tol:.0e}), "
        f"max abs. error {m['max_abs']:.2e}"
    )
    return Verification(ok, {**m, "tolerance": rel_tol}, msg)
