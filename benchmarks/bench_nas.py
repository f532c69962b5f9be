"""MAE-NAS benchmark: scores of DAMO-YOLO T/S/M, scoring speed, a 500k search, latency predictor.

Run: ``python benchmarks/bench_nas.py [--iterations 500000] [--latency-resolution 320]``.
Prints a Markdown section and writes it to ``docs/benchmarks/nas.md`` (plus the search curve
``docs/benchmarks/nas_curve.png``).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from pathlib import Path

from damo_plugins.nas.analysis import analyzer_for, join
from damo_plugins.nas.latency import op_key, profile, sample_genomes, spearman
from damo_plugins.nas.score import entropy_scores, madnas
from damo_plugins.nas.search import Budgets, Search, SearchConfig, plot_curve
from damo_plugins.nas.space import SearchSpace
from damo_plugins.nas.structures import resolve_structure

ROOT = Path(__file__).resolve().parent.parent
NAMES = {"T": "tinynas_L20_k1kx", "S": "tinynas_L25_k1kx", "M": "tinynas_L35_kxkx"}


def scores_table(workers: int) -> list[str]:
    lines = [
        "| backbone | structure | madnas | entropy (160 px, batch 32, 4 seeds) | layers | params (M) "
        "| GFLOPs @640 (2xMAC) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, name in NAMES.items():
        st = resolve_structure(name)
        an, g = analyzer_for(st, 640, True)
        m = an.metrics(g)
        ent = entropy_scores([st], resolution=160, batch=32, repeats=4, workers=workers)[0]
        lines.append(
            f"| DAMO-YOLO-{label} | `{name}` | {madnas(an, g):.2f} | {ent:.2f} | {m.layers} | "
            f"{m.params / 1e6:.3f} | {m.flops / 1e9:.2f} |"
        )
    return lines


def speed(workers: int, rounds: int = 3) -> tuple[list[str], dict[str, float]]:
    """Candidates/s of madnas (scoring alone, and the whole search loop) and entropy, interleaved."""
    space = SearchSpace("k1kx")
    an, init = space.bind(resolve_structure("init"))
    genomes = sample_genomes(space, init, 2000, seed=3)
    ent_structs = [join(an.bp, g) for g in genomes[:4]]
    mad, ent = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(25):
            for g in genomes:
                madnas(an, g)
        mad.append(25 * len(genomes) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        entropy_scores(ent_structs, resolution=160, batch=32, repeats=4, workers=workers)
        ent.append(len(ent_structs) / (time.perf_counter() - t0))
    res = {"madnas": statistics.median(mad), "entropy": statistics.median(ent)}
    lines = [
        "| score | candidates/s (median of 3 rounds) |",
        "|---|---|",
        f"| `madnas` (analytic, one process) | {res['madnas']:,.0f} |",
        f"| `entropy` (160 px, batch 32, 4 seeds, {workers} worker processes) | {res['entropy']:.3f} |",
        f"| ratio | {res['madnas'] / res['entropy']:,.0f}x |",
    ]
    return lines, res


def search_runs(iterations: int, seeds: list[int]) -> tuple[list[str], Path | None]:
    t = resolve_structure("t")
    an, g = analyzer_for(t, 640, True)
    t_score = madnas(an, g)
    budgets = Budgets(layers=20, flops=an.metrics(g).flops)
    lines = [
        f"Budget = DAMO-YOLO-T's: {budgets.flops / 1e9:.3f} GFLOPs at 640 (Focus) and 20 layers; "
        f"space k1kx, kernels 3/5, DAMO-YOLO's channel ranges, population 512, 2 mutations/child, "
        f"start from MAE-NAS's initial structure. T's own madnas score: **{t_score:.2f}**.",
        "",
        "| seed | candidates | wall time (s) | candidates/s | scored | over budget | duplicates "
        "| best madnas | vs T | best GFLOPs | best layers | best params (M) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    curve_png = None
    best_struct = None
    for seed in seeds:
        search = Search(
            resolve_structure("init"),
            SearchSpace("k1kx", mutations=2),
            budgets,
            SearchConfig(iterations=iterations, seed=seed),
        )
        res = search.run()
        b = res.best
        lines.append(
            f"| {seed} | {res.iterations:,} | {res.seconds:.1f} | {res.iterations / res.seconds:,.0f} | "
            f"{res.evaluated:,} | {res.rejected_budget:,} | {res.duplicates:,} | {b.score:.2f} | "
            f"{b.score - t_score:+.2f} | {b.metrics.flops / 1e9:.3f} | {b.metrics.layers} | "
            f"{b.metrics.params / 1e6:.3f} |"
        )
        if curve_png is None:
            curve_png = plot_curve(
                res.curve,
                ROOT / "docs" / "benchmarks" / "nas_curve.png",
                init_score=res.init.score,
                title=f"madnas search under T's budget (seed {seed})",
            )
            best_struct = res.structure
    if best_struct is not None:
        lines += ["", "Best structure of the first seed:", "", "```"]
        lines += [repr(b) for b in best_struct] + ["```"]
    return lines, curve_png


def measure_interleaved(
    structures: list, resolution: int, threads: int, rounds: int
) -> list[float]:
    """Whole-backbone OpenVINO latency: compile all, then alternate them in rounds; keep each
    one's fastest round median (the table's entries are kept the same way)."""
    import numpy as np
    import torch

    from damo_plugins.nas.backbone import PlainBackbone
    from damo_plugins.nas.latency import _median_ms, runner

    run = runner("openvino", "CPU", threads)
    reqs = []
    for st in structures:
        net = PlainBackbone(st, focus=True, bn=False, bias=True, out_indices=(len(st) - 1,)).eval()
        model = run.ov.convert_model(net, example_input=torch.zeros(1, 3, resolution, resolution))
        req = run.core.compile_model(model, "CPU", run.config).create_infer_request()
        x = np.random.default_rng(0).standard_normal(
            (1, 3, resolution, resolution), dtype=np.float32
        )
        req.set_input_tensor(run.ov.Tensor(x))
        reqs.append(req)
    best = [float("inf")] * len(reqs)
    for _ in range(rounds):
        for i, req in enumerate(reqs):
            best[i] = min(best[i], _median_ms(req.infer, 10, 2))
    return best


def latency_check(
    resolution: int, samples: int, threads: int, count: int = 20, rounds: int = 3
) -> list[str]:
    space = SearchSpace("k1kx")
    an, init = space.bind(resolve_structure("init"), resolution, True)
    table_genomes = [init, *sample_genomes(space, init, samples, seed=0)]
    keys = {op_key(op) for g in table_genomes for op in an.ops(g)}
    t0 = time.perf_counter()
    table = profile(keys, backend="openvino", threads=threads, repeats=10, rounds=rounds)
    t_profile = time.perf_counter() - t0
    # test structures: longer random walks than the table's, for a wider latency range
    tests = sample_genomes(space, init, count, seed=12345, steps=40)
    pred, missing, total_ops = [], 0, 0
    for g in tests:
        ops = an.ops(g)
        p, miss = table.predict_ops(ops)
        missing += miss
        total_ops += len(ops)
        pred.append(p)
    t0 = time.perf_counter()
    meas = measure_interleaved([join(an.bp, g) for g in tests], resolution, threads, rounds)
    t_measure = time.perf_counter() - t0
    rel = [abs(p - m) / m for p, m in zip(pred, meas)]
    signed = [(p - m) / m for p, m in zip(pred, meas)]
    return [
        f"Table: {len(keys)} convolutions of {samples} random k1kx structures + the initial one "
        f"(seed 0), OpenVINO CPU, {threads} thread, input {resolution} px with Focus, "
        f"inference precision {table.meta.get('inference_precision')}; profiling took {t_profile:.0f} s. "
        f"Test: {count} *other* random structures (seed 12345), whole plain backbone "
        f"(BN folded) converted with `ov.convert_model`; table entries and backbones are each "
        f"the fastest of {rounds} interleaved rounds' medians of 10 runs; {t_measure:.0f} s. "
        f"{missing} of {total_ops} conv ops of the test structures were not in the table "
        "(estimated from the nearest entry).",
        "",
        "| metric | value |",
        "|---|---|",
        f"| Spearman rank correlation (predicted vs measured) | {spearman(pred, meas):.3f} |",
        f"| mean relative error | {statistics.fmean(rel) * 100:.1f} % |",
        f"| mean signed error (bias) | {statistics.fmean(signed) * 100:+.1f} % |",
        f"| measured latency range | {min(meas):.2f} – {max(meas):.2f} ms |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iterations", type=int, default=500_000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--latency-resolution", type=int, default=320)
    ap.add_argument("--latency-samples", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-latency", action="store_true")
    args = ap.parse_args()
    random.seed(0)
    out: list[str] = [
        "## MAE-NAS (`damo-opt nas`)",
        "",
        f"Command: `python benchmarks/bench_nas.py` ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, shared with other jobs while measured: absolute times are noisy, "
        "ratios measured side by side are the figures to quote).",
        "",
        "### Scores of DAMO-YOLO's backbones",
        "",
        "Structures from tinyvision/DAMO-YOLO (`damo_plugins/assets/`), scored with the Focus "
        "stem (12 input channels) and DAMO-YOLO's stage weights alpha = 0,0,1,1,16. FLOPs are "
        "`torch.utils.flop_counter`'s (2 x MACs) of the plain `res` backbone (no SPP); "
        "params include BN.",
        "",
    ]
    out += scores_table(args.workers)
    out += ["", "### Scoring speed", ""]
    lines, _ = speed(args.workers)
    out += lines
    out += ["", f"### {args.iterations:,}-candidate madnas search under DAMO-YOLO-T's budget", ""]
    lines, png = search_runs(args.iterations, [int(s) for s in args.seeds.split(",")])
    out += lines
    if png is not None:
        out += ["", f"![search curve]({png.name})"]
    if not args.skip_latency:
        out += ["", "### Latency predictor (look-up table) against measured backbones", ""]
        out += latency_check(args.latency_resolution, args.latency_samples, args.threads)
    text = "\n".join(out) + "\n"
    print(text)
    dest = ROOT / "docs" / "benchmarks" / "nas.md"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text)


if __name__ == "__main__":
    main()
