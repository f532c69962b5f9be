"""Budgeted evolutionary search of backbone structures (MAE-NAS's searcher, single process).

The loop (upstream ``tinynas/searchers`` + ``evolutions``): pick a random member of the
population, mutate it, and keep the child if it is new to the population and within every
budget; the population stays sorted by score and is cut to its size. Cheap checks come
first (layers, then the analytic params/FLOPs/feature map, then the latency table), and the
analytic ``madnas`` score costs microseconds, so 500,000 candidates take a few minutes in
one Python process — no need for upstream's MPI workers.

With ``entropy`` (a forward pass per candidate) children are made in batches and scored as
independent tasks of an executor (:mod:`damo_plugins.lib.executors`): local worker processes
by default, or Ray tasks with ``ray`` (``local``, ``auto`` or a cluster address). A
candidate's score does not depend on where it ran (fixed per-repeat seeds), so a search on
Ray finds the same structure with the same score as a local one. The analytic ``madnas``
score always runs here: a task would cost a thousand times more than the score.

Everything random comes from one ``random.Random(seed)``; its state is saved in each
checkpoint with the population, so a resumed search continues exactly as an uninterrupted
one would (the tests check this).
"""

from __future__ import annotations

import bisect
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from damo_plugins.core.errors import DamoError
from damo_plugins.lib.executors import Executor, ExecutorError
from damo_plugins.models.structure import Structure, dumps_json, dumps_text, validate_structure
from damo_plugins.nas.analysis import ANALYSIS_VERSION, Genome, Metrics, join
from damo_plugins.nas.latency import LatencyTable
from damo_plugins.nas.score import DAMO_ALPHA, check_alpha, entropy_genomes, madnas
from damo_plugins.nas.space import SearchSpace

CHECKPOINT_FORMAT = "damo-nas-search/1"


@dataclass
class Budgets:
    """Upper limits; ``None`` means unconstrained.

    Params and FLOPs are :class:`~damo_plugins.nas.analysis.Analyzer`'s, i.e. exactly
    ``sum(p.numel())`` and ``torch.utils.flop_counter`` of the deployed backbone the DAMO-YOLO
    builder makes of a candidate (SPP and CSP layout included).
    """

    layers: int | None = None
    params: int | None = None
    flops: int | None = None
    latency_ms: float | None = None
    max_feature: int | None = None

    def violations(self, m: Metrics, latency_ms: float | None = None) -> list[str]:
        out = []
        for name in ("layers", "params", "flops", "max_feature"):
            limit = getattr(self, name)
            if limit is not None and getattr(m, name) > limit:
                out.append(f"{name} {getattr(m, name):,} > {limit:,}")
        if self.latency_ms is not None and latency_ms is not None and latency_ms > self.latency_ms:
            out.append(f"latency {latency_ms:.3f} ms > {self.latency_ms:.3f} ms")
        return out


@dataclass
class SearchConfig:
    population: int = 512
    iterations: int = 500_000
    seed: int = 0
    score: str = "madnas"
    alpha: tuple[float, ...] = DAMO_ALPHA
    resolution: int = 640
    focus: bool = True
    checkpoint_every: int = 50_000
    curve_points: int = 200
    # entropy only
    entropy_resolution: int = 160
    entropy_batch: int = 32
    entropy_repeats: int = 4
    workers: int | None = None
    batch: int = 8
    #: entropy only: run the scoring on Ray (``local``, ``auto``, an address; ``None``: the
    #: ``DAMO_RAY_ADDRESS`` environment variable, else local processes)
    ray: str | None = None

    def __post_init__(self) -> None:
        if self.score not in ("madnas", "entropy"):
            raise DamoError(f"unknown score {self.score!r}", "one of madnas, entropy")
        for name in ("population", "iterations", "checkpoint_every", "batch"):
            if getattr(self, name) < 1:
                raise DamoError(f"search {name} must be at least 1, got {getattr(self, name)}")


@dataclass
class Member:
    genome: Genome
    score: float
    metrics: Metrics
    latency_ms: float | None = None


@dataclass
class SearchResult:
    best: Member
    structure: Structure
    population: list[Member]
    iterations: int
    evaluated: int
    rejected_budget: int
    duplicates: int
    curve: list[tuple[int, float]]
    seconds: float
    init: Member
    extra: dict[str, Any] = field(default_factory=dict)


class Search:
    """One search: space + budgets + config, optionally a latency table and an output dir."""

    def __init__(
        self,
        init: Structure,
        space: SearchSpace,
        budgets: Budgets,
        config: SearchConfig,
        latency: LatencyTable | None = None,
    ) -> None:
        self.space = space
        self.budgets = budgets
        self.config = config
        self.latency = latency
        if budgets.latency_ms is not None and latency is None:
            raise DamoError(
                "a latency budget needs a latency table",
                "measure one with 'damo-opt nas profile' and pass --latency-table",
            )
        self.analyzer, genome = space.bind(
            validate_structure(init), config.resolution, config.focus, budgets.layers
        )
        check_alpha(self.analyzer, config.alpha)
        # The entropy score of the initial structure is computed at the start of run(), by
        # the executor that scores the children (no worker pool or cluster in __init__).
        self.init_member = self._evaluate_one(genome, score=config.score == "madnas")
        self._executor: Executor | None = None
        why = self._violations(self.init_member)
        if why:
            raise DamoError(
                f"the initial structure is over budget ({'; '.join(why)})",
                "start from a smaller --init structure (MAE-NAS starts well inside the budget)",
            )

    # ------------------------------------------------------------------ evaluation
    def _violations(self, m: Member) -> list[str]:
        return self.budgets.violations(m.metrics, m.latency_ms)

    def _evaluate_one(self, genome: Genome, score: bool) -> Member:
        metrics = self.analyzer.metrics(genome)
        lat = self.latency.predict(self.analyzer, genome) if self.latency is not None else None
        s = self._scores([genome])[0] if score else math.nan
        return Member(genome, s, metrics, lat)

    def _scores(self, genomes: Sequence[Genome]) -> list[float]:
        c = self.config
        if c.score == "madnas":
            return [madnas(self.analyzer, g, c.alpha) for g in genomes]
        return entropy_genomes(
            self.analyzer,
            genomes,
            resolution=c.entropy_resolution,
            alpha=c.alpha,
            batch=c.entropy_batch,
            repeats=c.entropy_repeats,
            workers=c.workers,
            seed=c.seed,
            executor=self._executor,
        )

    # ------------------------------------------------------------------ the loop
    def run(
        self,
        outdir: str | Path | None = None,
        resume: str | Path | None = None,
        progress: bool = False,
        executor: Executor | None = None,
        log: Callable[[str], None] | None = None,
    ) -> SearchResult:
        """Search; with ``outdir``, checkpoint every ``checkpoint_every`` candidates.

        ``executor`` scores entropy candidates (default: one opened from the config's ``ray``
        and ``workers`` for this run and closed after it). If the executor fails (a lost
        cluster), the state before the unfinished batch is saved as the checkpoint and the
        error says how to resume: the resumed search ends exactly as an uninterrupted one.
        """
        c = self.config
        if c.score != "entropy":
            return self._run(outdir, resume, progress)
        from damo_plugins.lib.executors import open_executor

        own = executor is None
        self._executor = open_executor(c.ray, c.workers) if executor is None else executor
        if log is not None:
            log(f"scoring entropy candidates on {self._executor.describe()}")
        try:
            if math.isnan(self.init_member.score):
                try:
                    self.init_member.score = self._scores([self.init_member.genome])[0]
                except ExecutorError as exc:  # before the loop: no new state to save
                    what = (
                        "checkpoint is unchanged" if resume is not None else "search had not begun"
                    )
                    raise ExecutorError(
                        exc.message, f"the {what}: re-run the same command"
                    ) from None
            return self._run(outdir, resume, progress)
        finally:
            if own:
                self._executor.close()
            self._executor = None

    def _run(
        self,
        outdir: str | Path | None,
        resume: str | Path | None,
        progress: bool,
    ) -> SearchResult:
        c = self.config
        rng = random.Random(c.seed)
        keys: list[float] = []  # -score, ascending = best first
        pop: list[Member] = []
        members: set[Genome] = set()
        curve: list[tuple[int, float]] = []
        it = evaluated = rejected = dups = 0
        elapsed = 0.0
        if resume is not None:
            state = load_checkpoint(resume)
            self._check_resume(state)
            rng.setstate(_rng_from_json(state["rng"]))
            it, evaluated = state["iteration"], state["evaluated"]
            rejected, dups = state["rejected_budget"], state["duplicates"]
            elapsed = float(state.get("seconds", 0.0))
            curve = [(int(a), float(b)) for a, b in state["curve"]]
            for rec in state["population"]:
                g = tuple(tuple(x) for x in rec["genome"])
                m = Member(g, float(rec["score"]), Metrics(**rec["metrics"]), rec.get("latency_ms"))
                keys.append(-m.score)
                pop.append(m)
                members.add(g)
        else:
            keys, pop, members = (
                [-self.init_member.score],
                [self.init_member],
                {self.init_member.genome},
            )
        outdir = Path(outdir) if outdir is not None else None
        curve_every = max(1, c.iterations // max(1, c.curve_points))
        batch = 1 if c.score == "madnas" else c.batch
        scored_remotely = c.score == "entropy"
        analyzer, budgets, latency, mutate = (
            self.analyzer,
            self.budgets,
            self.latency,
            self.space.mutate,
        )
        lat_limit = budgets.latency_ms
        t0 = time.perf_counter()
        bar = _Progress(c.iterations, it, enabled=progress)
        next_ckpt = (it // c.checkpoint_every + 1) * c.checkpoint_every
        try:
            while it < c.iterations:
                if scored_remotely:  # the state a failed batch falls back to (see run)
                    before = (rng.getstate(), it, evaluated, rejected, dups, len(curve))
                children: list[tuple[Genome, Metrics, float | None]] = []
                fresh: set[Genome] = set()
                while len(children) < batch and it < c.iterations:
                    it += 1
                    child = mutate(pop[rng.randrange(len(pop))].genome, rng)
                    if child in members or child in fresh:
                        dups += 1
                    else:
                        m = analyzer.metrics(child)
                        lat = latency.predict(analyzer, child) if latency is not None else None
                        if (
                            budgets.violations(m, lat)
                            if lat_limit is not None
                            else _over(budgets, m)
                        ):
                            rejected += 1
                        else:
                            children.append((child, m, lat))
                            fresh.add(child)
                    if it % curve_every == 0 or (it & (it - 1)) == 0:  # + powers of 2 (log axis)
                        curve.append((it, -keys[0]))
                    if it % 2048 == 0:
                        bar.update(it, -keys[0])
                if children:
                    try:
                        scores = self._scores([g for g, _, _ in children])
                    except ExecutorError as exc:
                        if outdir is None:
                            raise
                        state, it0, ev0, rej0, dup0, ncurve = before
                        rng.setstate(state)
                        path = outdir / "checkpoint.json"
                        self._save(
                            path,
                            rng,
                            it0,
                            ev0,
                            rej0,
                            dup0,
                            curve[:ncurve],
                            pop,
                            elapsed + time.perf_counter() - t0,
                        )
                        raise ExecutorError(
                            exc.message,
                            f"the search is saved at candidate {it0:,}: re-run the same "
                            f"command with --resume {path}",
                        ) from None
                    evaluated += len(children)
                    for (g, m, lat), s in zip(children, scores):
                        j = bisect.bisect_right(keys, -s)
                        if j >= c.population:
                            continue
                        keys.insert(j, -s)
                        pop.insert(j, Member(g, s, m, lat))
                        members.add(g)
                        if len(pop) > c.population:
                            keys.pop()
                            members.discard(pop.pop().genome)
                # checkpoints fall between batches, so the saved state is complete
                if outdir is not None and it >= next_ckpt and it < c.iterations:
                    self._save(
                        outdir / "checkpoint.json",
                        rng,
                        it,
                        evaluated,
                        rejected,
                        dups,
                        curve,
                        pop,
                        elapsed + time.perf_counter() - t0,
                    )
                    next_ckpt = (it // c.checkpoint_every + 1) * c.checkpoint_every
        finally:
            bar.close()
        if not curve or curve[-1][0] != it:
            curve.append((it, -keys[0]))
        seconds = elapsed + time.perf_counter() - t0
        if outdir is not None:
            self._save(
                outdir / "checkpoint.json", rng, it, evaluated, rejected, dups, curve, pop, seconds
            )
        best = pop[0]
        return SearchResult(
            best,
            join(analyzer.bp, best.genome),
            pop,
            it,
            evaluated,
            rejected,
            dups,
            curve,
            seconds,
            self.init_member,
        )

    # ------------------------------------------------------------------ checkpoints
    def _fingerprint(self) -> dict[str, Any]:
        c = self.config
        sp = self.space
        return {
            "analysis": ANALYSIS_VERSION,
            "blueprint": {
                "in": self.analyzer.bp.in_channels,
                "classes": list(self.analyzer.bp.classes),
                "strides": list(self.analyzer.bp.strides),
            },
            "space": {
                "kind": sp.kind,
                "kernels": list(sp.kernels),
                "mutations": sp.mutations,
                "channel_ranges": [list(r) if r else None for r in sp.channel_ranges],
                "max_depth": sp.max_depth,
            },
            "budgets": asdict(self.budgets),
            "score": c.score,
            "alpha": list(c.alpha),
            "resolution": c.resolution,
            "focus": c.focus,
            "population": c.population,
            "seed": c.seed,
            # entropy scores depend on these too: a resume with others would mix scales
            **(
                {
                    "entropy": {
                        "resolution": c.entropy_resolution,
                        "batch": c.entropy_batch,
                        "repeats": c.entropy_repeats,
                        "search_batch": c.batch,
                    }
                }
                if c.score == "entropy"
                else {}
            ),
        }

    def _check_resume(self, state: dict[str, Any]) -> None:
        mine = json.loads(json.dumps(self._fingerprint()))
        theirs = state.get("setup")
        if theirs != mine:
            diff = sorted(k for k in mine if mine.get(k) != (theirs or {}).get(k))
            raise DamoError(
                f"checkpoint was made by a different search (differs in: {', '.join(diff) or 'format'})",
                "resume with the same options as the original search",
            )
        if state["iteration"] > self.config.iterations:
            raise DamoError(
                f"checkpoint is at iteration {state['iteration']}, beyond --iterations {self.config.iterations}"
            )

    def _save(
        self,
        path: Path,
        rng: random.Random,
        it: int,
        evaluated: int,
        rejected: int,
        dups: int,
        curve: list[tuple[int, float]],
        pop: list[Member],
        seconds: float,
    ) -> None:
        from damo_plugins.core.io import write_text

        state = {
            "format": CHECKPOINT_FORMAT,
            "setup": self._fingerprint(),
            "iteration": it,
            "evaluated": evaluated,
            "rejected_budget": rejected,
            "duplicates": dups,
            "seconds": seconds,
            "rng": _rng_to_json(rng.getstate()),
            "curve": [list(p) for p in curve],
            "population": [
                {
                    "genome": [list(g) for g in m.genome],
                    "score": m.score,
                    "metrics": m.metrics.as_dict(),
                    "latency_ms": m.latency_ms,
                }
                for m in pop
            ],
        }
        write_text(path, json.dumps(state) + "\n")


def _over(budgets: Budgets, m: Metrics) -> bool:
    """Fast path of :meth:`Budgets.violations` without a latency budget."""
    return (
        (budgets.layers is not None and m.layers > budgets.layers)
        or (budgets.flops is not None and m.flops > budgets.flops)
        or (budgets.params is not None and m.params > budgets.params)
        or (budgets.max_feature is not None and m.max_feature > budgets.max_feature)
    )


def _rng_to_json(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(data: list[Any]) -> tuple[Any, ...]:
    try:
        version, internal, gauss = data
        return (int(version), tuple(int(x) for x in internal), gauss)
    except (TypeError, ValueError):
        raise DamoError("checkpoint: corrupt random-generator state") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    from damo_plugins.core.io import check_input_file

    p = check_input_file(path, "checkpoint")
    try:
        state = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DamoError(f"{p}: checkpoint is not JSON ({exc})") from None
    needed = (
        "setup",
        "iteration",
        "evaluated",
        "rejected_budget",
        "duplicates",
        "rng",
        "curve",
        "population",
    )
    if (
        not isinstance(state, dict)
        or state.get("format") != CHECKPOINT_FORMAT
        or any(k not in state for k in needed)
    ):
        raise DamoError(f"{p}: not a search checkpoint ({CHECKPOINT_FORMAT})")
    if not state["population"]:
        raise DamoError(f"{p}: checkpoint has an empty population")
    return state


class _Progress:
    """A rich progress bar that costs nothing when disabled (tests, --no-progress)."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self._p = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._p = Progress(
            TextColumn("search"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("best {task.fields[best]}"),
            transient=False,
        )
        self._p.start()
        self._task = self._p.add_task("search", total=total, completed=start, best="-")

    def update(self, it: int, best: float) -> None:
        if self._p is not None:
            self._p.update(self._task, completed=it, best=f"{best:.2f}")

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()


# ---------------------------------------------------------------------- outputs
def write_outputs(
    result: SearchResult,
    search: Search,
    outdir: str | Path,
    log: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """best.json / best.txt (the structure), report.json, report.md and curve.png."""
    from damo_plugins.core.io import write_text

    outdir = Path(outdir)
    files = {
        "structure": write_text(outdir / "best.json", dumps_json(result.structure)),
        "structure_txt": write_text(outdir / "best.txt", dumps_text(result.structure)),
    }
    report = search_report(result, search)
    plot = plot_curve(result.curve, outdir / "curve.png", init_score=result.init.score)
    if plot is not None:
        files["curve"] = plot
        report["curve_png"] = plot.name
    elif log:
        log("matplotlib is not installed: no curve.png (the curve is in report.json)")
    files["report"] = write_text(outdir / "report.json", json.dumps(report, indent=1) + "\n")
    files["report_md"] = write_text(outdir / "report.md", report_markdown(report))
    files["checkpoint"] = outdir / "checkpoint.json"
    return files


def _member_json(m: Member) -> dict[str, Any]:
    return {"score": m.score, **m.metrics.as_dict(), "latency_ms": m.latency_ms}


def search_report(result: SearchResult, search: Search) -> dict[str, Any]:
    return {
        "best": {**_member_json(result.best), "structure": result.structure},
        "init": _member_json(result.init),
        "setup": search._fingerprint(),
        "iterations": result.iterations,
        "evaluated": result.evaluated,
        "rejected_budget": result.rejected_budget,
        "duplicates": result.duplicates,
        "seconds": round(result.seconds, 3),
        "candidates_per_second": round(result.iterations / result.seconds, 1)
        if result.seconds
        else None,
        "curve": [list(p) for p in result.curve],
        "top": [_member_json(m) for m in result.population[:10]],
    }


def report_markdown(report: dict[str, Any]) -> str:
    b, i, s = report["best"], report["init"], report["setup"]

    def row(name: str, m: dict[str, Any]) -> str:
        lat = f"{m['latency_ms']:.3f}" if m.get("latency_ms") is not None else "-"
        return (
            f"| {name} | {m['score']:.3f} | {m['layers']} | {m['params'] / 1e6:.3f} | "
            f"{m['flops'] / 1e9:.3f} | {lat} |"
        )

    lines = [
        "# MAE-NAS search",
        "",
        f"Score `{s['score']}` (alpha {s['alpha']}), space `{s['space']['kind']}`, resolution "
        f"{s['resolution']}{' with Focus' if s['focus'] else ''}, population {s['population']}, "
        f"seed {s['seed']}.",
        f"Budgets: {', '.join(f'{k}={v}' for k, v in s['budgets'].items() if v is not None) or 'none'}.",
        f"{report['iterations']:,} candidates in {report['seconds']:.1f} s "
        f"({report['candidates_per_second']} /s): {report['evaluated']:,} scored, "
        f"{report['rejected_budget']:,} over budget, {report['duplicates']:,} duplicates.",
        "",
        "| | score | layers | params (M) | GFLOPs (2xMAC) | latency (ms) |",
        "|---|---|---|---|---|---|",
        row("initial", i),
        row("best", b),
        "",
        "Best structure:",
        "",
        "```",
        dumps_text(b["structure"]).rstrip(),
        "```",
    ]
    if report.get("curve_png"):
        lines += ["", f"![search curve]({report['curve_png']})"]
    return "\n".join(lines) + "\n"


def plot_curve(
    curve: Sequence[tuple[int, float]],
    path: Path,
    init_score: float | None = None,
    title: str = "MAE-NAS search",
) -> Path | None:
    """Best score against candidates evaluated (matplotlib Agg); ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from damo_plugins.core.io import atomic_path

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p[0] for p in curve], [p[1] for p in curve], lw=1.5, label="best in population")
    if init_score is not None:
        ax.axhline(init_score, color="grey", ls="--", lw=1, label="initial")
    if curve and curve[-1][0] >= 1000:
        ax.set_xscale("log")
    ax.set_xlabel("candidates")
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
