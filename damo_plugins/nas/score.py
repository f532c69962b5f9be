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
which the tests check. Its forward passes are executor tasks
(:mod:`damo_plugins.lib.executors`): local worker processes by default, or Ray.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from damo_plugins.core.errors import DamoError
from damo_plugins.nas.analysis import Analyzer, Genome, Structure, analyzer_for, join

if TYPE_CHECKING:  # pragma: no cover
    from damo_plugins.lib.executors import Executor

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


def _entropy_task(task: tuple[Structure, bool, int, int, int]) -> list[float]:
    """One (structure, repeat) forward pass, as an executor task (picklable by reference)."""
    return _entropy_once(*task)


def default_workers() -> int:
    from damo_plugins.lib.executors import default_workers as workers

    return workers()


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
    executor: Executor | None = None,
) -> list[float]:
    """Forward entropy score of each structure, averaged over ``repeats`` fixed seeds.

    The (structure, repeat) forward passes are independent tasks. Repeat ``r`` of every
    structure uses seed ``seed + r`` whatever runs it, so a score does not depend on the
    worker, the batch it came in or the executor (local pool or Ray): a search gives the
    same result everywhere. Without ``executor`` they are spread over ``workers`` local
    processes (one torch thread each, which is faster on few cores than one process with
    several threads for these small convolutions); ``workers=0`` runs in this process.
    """
    analyzers = []
    for st in structures:
        an, genome = analyzer_for(st, resolution, focus)
        check_alpha(an, alpha)
        analyzers.append((an, genome))
    tasks = [(st, focus, resolution, batch, seed + r) for st in structures for r in range(repeats)]
    if executor is not None:
        results = executor.map(_entropy_task, tasks)
    else:
        workers = default_workers() if workers is None else workers
        if workers <= 0 or len(tasks) == 1:
            results = [_entropy_task(t) for t in tasks]
        else:
            from damo_plugins.lib.executors import LocalExecutor

            with LocalExecutor(min(workers, len(tasks))) as pool:
                results = pool.map(_entropy_task, tasks)
    scores = []
    for j, (an, genome) in enumerate(analyzers):
        runs = results[j * repeats : (j + 1) * repeats]
        scores.append(sum(aggregate(an, genome, r, alpha) for r in runs) / repeats)
    return scores


def entropy_genomes(analyzer: Analyzer, genomes: Sequence[Genome], **kwargs: object) -> list[float]:
    return entropy_scores([join(analyzer.bp, g) for g in genomes], focus=analyzer.focus, **kwargs)  # type: ignore[arg-type]
