"""Training-free scores of a backbone: MAE-NAS's analytic ``madnas`` and forward ``entropy``.

Both rest on one idea (MAE-DET, Sun et al. 2022): with Gaussian weights and Gaussian input,
a network with more expressive power produces features of larger entropy, and for a
Gaussian the (differential) entropy is, up to constants, the log of its standard deviation.
Each residual unit multiplies the feature std; summing the *log* stds of the units up to the
end of a stage, plus ``ln`` of the stage's width, gives that stage's entropy. The score is a
weighted sum over stages with weights ``alpha`` (DAMO-YOLO: ``[0, 0, 1, 1, 16]``, i.e. only
the three detection stages count, the deepest one most).

``madnas`` predicts every log std in closed form: a convolution with ``N(0, 1)`` weights and
``C_in * k * k`` inputs per output scales a unit-variance input's std by
``sqrt(C_in * k * k)`` (stem ``ln sqrt(C_in k^2)``; a k1kx unit ``ln sqrt(C_in) + ln sqrt(btn k^2)``;
a kxkx unit ``ln sqrt(C_in k^2) + ln sqrt(btn k^2)``, where ``C_in`` is the block's input
channels for its first unit and its output channels for the others). This is exactly the
computation of upstream's ``compute_madnas.py`` / ``get_madnas_forward`` (checked against
alibaba/lightweight-neural-architecture-search); it costs microseconds.

``entropy`` measures those stds instead: it runs the backbone (BN, activations and shortcuts
bypassed, weights ``N(0, 1)``) on a Gaussian batch, divides each unit's output by its std and
accumulates the log stds, averaged over seeded repeats. Zero padding makes the measured stds
slightly smaller than the closed form, most at small feature maps; otherwise the two agree,
which the tests check. It runs in worker processes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from damo_plugins.core.errors import DamoError
from damo_plugins.nas.analysis import Analyzer, Genome, Structure, analyzer_for, join

#: DAMO-YOLO's stage weights (configs/damoyolo/*.py upstream: multi_block_ratio)
DAMO_ALPHA: tuple[float, ...] = (0.0, 0.0, 1.0, 1.0, 16.0)


def check_alpha(analyzer: Analyzer, alpha: Sequence[float]) -> None:
    """MAE-NAS needs one weight per stage; say so clearly instead of a bare ValueError."""
    n = len(analyzer.stage_ends)
    if len(alpha) != n:
        raise DamoError(
            f"the structure has {n} stages but {len(alpha)} stage weights (alpha) were given",
            "a stage ends before each stride-2 block and at the last block; "
            f"pass --alpha with {n} comma-separated weights",
        )


def block_log_stds(analyzer: Analyzer, genome: Genome) -> list[float]:
    """Closed-form log std gain of each block (sum over its residual units)."""
    log = math.log
    out: list[float] = []
    cin = analyzer.stem_in
    for i, (c, btn, k, depth) in enumerate(genome):
        k1flag = analyzer.k1[i]
        kk = k * k
        if k1flag is None:
            out.append(0.5 * log(cin * kk))
        else:
            second = 0.5 * log(btn * kk)
            if k1flag:
                first, rest = 0.5 * log(cin), 0.5 * log(c)
            else:
                first, rest = 0.5 * log(cin * kk), 0.5 * log(c * kk)
            out.append(first + second + (depth - 1) * (rest + second))
        cin = c
    return out


def aggregate(
    analyzer: Analyzer, genome: Genome, block_stds: Sequence[float], alpha: Sequence[float]
) -> float:
    """Per-stage entropy (cumulative log std + ln width), weighted by ``alpha`` and summed."""
    total = 0.0
    cum = 0.0
    stage = 0
    ends = analyzer.stage_ends
    for i, ell in enumerate(block_stds):
        cum += ell
        if stage < len(ends) and i == ends[stage]:
            a = alpha[stage]
            if a:
                total += a * (cum + math.log(genome[i][0]))
            stage += 1
    return total


def madnas(analyzer: Analyzer, genome: Genome, alpha: Sequence[float] = DAMO_ALPHA) -> float:
    """MAE-NAS's analytic score (what DAMO-YOLO's backbones were searched with)."""
    return aggregate(analyzer, genome, block_log_stds(analyzer, genome), alpha)


def madnas_structure(
    structure: Structure,
    resolution: int = 640,
    focus: bool = True,
    alpha: Sequence[float] = DAMO_ALPHA,
) -> float:
    an, genome = analyzer_for(structure, resolution, focus)
    check_alpha(an, alpha)
    return madnas(an, genome, alpha)


# ---------------------------------------------------------------------------- entropy
def _entropy_once(
    structure: Structure, focus: bool, resolution: int, batch: int, seed: int
) -> list[float]:
    """One seeded forward pass; returns the measured log std of each block (all units)."""
    import torch

    from damo_plugins.nas.backbone import PlainBackbone

    gen = torch.Generator().manual_seed(seed)
    net = PlainBackbone(structure, focus=focus, bn=False, act=False, bias=False)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        x = torch.randn(batch, structure[0]["in"], resolution, resolution, generator=gen)
        return net.entropy_forward(x)


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def default_workers() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))


def entropy_scores(
    structures: Sequence[Structure],
    *,
    resolution: int = 160,
    focus: bool = True,
    alpha: Sequence[float] = DAMO_ALPHA,
    batch: int = 32,
    repeats: int = 4,
    workers: int | None = None,
    seed: int = 0,
) -> list[float]:
    """Forward entropy score of each structure, averaged over ``repeats`` fixed seeds.

    The (structure, repeat) forward passes are spread over ``workers`` processes (one torch
    thread each, which is faster on few cores than one process with several threads for
    these small convolutions). ``workers=0`` runs in this process.
    """
    analyzers = []
    for st in structures:
        an, genome = analyzer_for(st, resolution, focus)
        check_alpha(an, alpha)
        analyzers.append((an, genome))
    tasks = [(st, focus, resolution, batch, seed + r) for st in structures for r in range(repeats)]
    workers = default_workers() if workers is None else workers
    if workers <= 0 or len(tasks) == 1:
        results = [_entropy_once(*t) for t in tasks]
    else:
        with ProcessPoolExecutor(
            max_workers=min(workers, len(tasks)),
            mp_context=get_context("spawn"),
            initializer=_worker_init,
        ) as pool:
            results = list(pool.map(_entropy_once, *zip(*tasks)))
    scores = []
    for j, (an, genome) in enumerate(analyzers):
        runs = results[j * repeats : (j + 1) * repeats]
        scores.append(sum(aggregate(an, genome, r, alpha) for r in runs) / repeats)
    return scores


def entropy_genomes(analyzer: Analyzer, genomes: Sequence[Genome], **kwargs: object) -> list[float]:
    return entropy_scores([join(analyzer.bp, g) for g in genomes], focus=analyzer.focus, **kwargs)  # type: ignore[arg-type]
