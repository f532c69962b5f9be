"""Box geometry shared by NMS, mAP matching, label assignment and INT8 fidelity.

One pairwise IoU serves numpy arrays (fidelity checks on runtime outputs, the synthetic data
generator) and torch tensors (NMS, the training assigner, where gradients may flow), so the
four places that compare boxes cannot drift apart in edge cases (degenerate boxes, the
epsilon in the union). torch is imported only when a tensor is given.
"""

from __future__ import annotations

from typing import Any, TypeVar

Boxes = TypeVar("Boxes")


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def box_iou(a: Boxes, b: Boxes, eps: float = 1e-9) -> Boxes:
    """Pairwise IoU of ``[N, 4]`` and ``[M, 4]`` ``x1, y1, x2, y2`` boxes -> ``[N, M]``.

    Both numpy arrays or both torch tensors; the result has the same type (and, for tensors,
    keeps the autograd graph). Boxes with ``x2 < x1`` or ``y2 < y1`` have zero area; the
    union is floored at ``eps`` so two empty boxes give 0, not NaN.
    """
    if _is_tensor(a):
        import torch

        xp: Any = torch
    else:
        import numpy as np

        xp = np
        a, b = np.asarray(a), np.asarray(b)  # type: ignore[assignment]

    def area(x: Any) -> Any:
        return xp.clip(x[:, 2] - x[:, 0], 0, None) * xp.clip(x[:, 3] - x[:, 1], 0, None)

    lt = xp.maximum(a[:, None, :2], b[None, :, :2])  # type: ignore[index]
    rb = xp.minimum(a[:, None, 2:], b[None, :, 2:])  # type: ignore[index]
    inter = xp.clip(rb - lt, 0, None).prod(-1)
    union = area(a)[:, None] + area(b)[None, :] - inter
    return inter / xp.clip(union, eps, None)
