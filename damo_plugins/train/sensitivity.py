"""Pruning sensitivity: the mAP cost of pruning each layer block alone, cached on disk.

Why: a uniform ratio removes as many channels from the stem as from the widest neck block,
although the layers differ widely in how much accuracy their channels carry. For each block
(:func:`damo_plugins.train.prune.block_of`: a backbone stage or a neck fusion block) we prune
*only that block* at a probe ratio, with the same importance the real step uses, and measure
the mAP on a small control split; the drop from the unpruned mAP is the block's sensitivity.
:func:`allocate` then turns sensitivities into per-block ratios (the most sensitive block is
pruned least) scaled so that a global FLOPs goal is met.

One analysis costs one evaluation per block (16 for DAMO-YOLO-T), so the result is cached
under a content hash of everything it depends on — the model's weights, the control images
and their labels, the Taylor images when Taylor ranks channels, and the settings — in
``CACHE/sensitivity-<hash>.json``; a rerun with the same inputs reads it instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from damo_plugins.core.errors import DamoError

#: bump when the measurement changes, so old cache entries are not reused
VERSION = 1


@dataclass
class Sensitivity:
    """The analysis: unpruned control mAP and, per block, the mAP with that block pruned."""

    key: str
    base_map: float
    blocks: dict[str, dict[str, float]]
    settings: dict[str, Any]
    cached: bool = False
    evaluations: int = 0
    seconds: float = 0.0
    path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def drops(self) -> dict[str, float]:
        """mAP lost per block (negative drops — pruning helped, i.e. noise — count as 0)."""
        return {b: max(0.0, float(v["drop"])) for b, v in self.blocks.items()}


def cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    """``cache_dir`` or ``$XDG_CACHE_HOME/damo-plugins/sensitivity`` (``~/.cache`` by default)."""
    if cache_dir is not None:
        return Path(cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "damo-plugins" / "sensitivity"


def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())


def content_key(model: nn.Module, samples: list[tuple[Any, ...]], settings: dict[str, Any]) -> str:
    """SHA-256 of (weights and buffers, the images and targets measured on, settings)."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": VERSION, **settings}, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        _hash_tensor(h, t)
    for sample in samples:
        for part in sample[:2]:  # image, target (the info dict holds ids and paths only)
            if isinstance(part, torch.Tensor):
                _hash_tensor(h, part)
            elif isinstance(part, np.ndarray):
                _hash_tensor(h, torch.from_numpy(np.ascontiguousarray(part)))
    return h.hexdigest()


def analyse(
    model: nn.Module,
    blocks: list[str],
    prune_block: Callable[[str], nn.Module],
    evaluate: Callable[[nn.Module], float],
    key: str,
    settings: dict[str, Any],
    cache_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] = print,
) -> Sensitivity:
    """Per block, the control mAP with only that block pruned (``prune_block(name)`` returns a
    pruned copy); read from the cache when an entry with ``key`` exists."""
    root = cache_root(cache_dir)
    path = root / f"sensitivity-{key[:32]}.json"
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            stored = None  # a damaged entry is recomputed and rewritten
        if isinstance(stored, dict) and stored.get("key") == key:
            log(f"  sensitivity: reusing {path}")
            return Sensitivity(
                key,
                float(stored["base_map"]),
                {b: dict(v) for b, v in stored["blocks"].items()},
                dict(stored.get("settings") or {}),
                cached=True,
                evaluations=0,
                seconds=0.0,
                path=str(path),
            )
    t0 = time.perf_counter()
    base = evaluate(model)
    result: dict[str, dict[str, float]] = {}
    for b in blocks:
        m = evaluate(prune_block(b))
        result[b] = {"mAP": round(m, 4), "drop": round(base - m, 4)}
        log(f"  sensitivity: {b} alone -> mAP {m:.4f} ({base - m:+.4f})")
    sens = Sensitivity(
        key,
        round(base, 4),
        result,
        settings,
        cached=False,
        evaluations=len(blocks) + 1,
        seconds=round(time.perf_counter() - t0, 2),
        path=str(path),
    )
    _store(path, sens)
    return sens


def _store(path: Path, sens: Sensitivity) -> None:
    from damo_plugins.core.io import write_text

    payload = {
        "key": sens.key,
        "base_map": sens.base_map,
        "blocks": sens.blocks,
        "settings": sens.settings,
        "seconds": sens.seconds,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(payload, indent=1, default=str))
    except OSError as exc:
        raise DamoError(
            f"cannot write the sensitivity cache {path}: {exc.strerror or exc}",
            "give cache_dir: <a writable folder>",
        ) from None


def weights(sens: Sensitivity, strength: float) -> dict[str, float]:
    """Relative pruning weight per block: 1 for the least sensitive, ``1 - strength`` for the
    most; linear in between (drops normalised by the largest). No measurable drop anywhere
    (an untrained model, a too-small control split) gives equal weights: uniform pruning."""
    drops = sens.drops()
    top = max(drops.values(), default=0.0)
    if top <= 0:
        return {b: 1.0 for b in drops}
    return {b: 1.0 - strength * d / top for b, d in drops.items()}


def allocate(w: dict[str, float], scale: float, cap: float) -> dict[str, float]:
    """Per-block ratios ``min(cap, scale * weight)`` — :func:`search_flops` picks ``scale``."""
    return {b: min(cap, scale * v) for b, v in w.items()}
