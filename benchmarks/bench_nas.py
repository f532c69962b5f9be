"""MAE-NAS benchmark: scores of DAMO-YOLO T/S/M, scoring speed, a 500k search, latency predictor.

Run: ``python benchmarks/bench_nas.py [--iterations 500000] [--latency-resolution 320]``.
Prints a Markdown section and writes it to ``docs/benchmarks/nas.md`` (``--doc``), with the
search curve ``nas_curve.png`` beside it.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from common import DOCS, command, interleave, machine_line, write_section

from damo_plugins.nas.analysis import analyzer_for, join
from damo_plugins.nas.latency import (
    calibrated,
    mean_rel_error,
    measure_backbones,
    op_key,
    profile,
    sample_genomes,
    spearman,
)
from damo_plugins.nas.score import entropy_scores, madnas
from damo_plugins.nas.search import Budgets, Search, SearchConfig, plot_curve
from damo_plugins.nas.space import SearchSpace
from damo_plugins.nas.structures import resolve_structure

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

    def madnas_rate() -> float:
        t0 = time.perf_counter()
        for _ in range(25):
            for g in genomes:
                madnas(an, g)
        return 25 * len(genomes) / (time.perf_counter() - t0)

    def entropy_rate() -> float:
        t0 = time.perf_counter()
        entropy_scores(ent_structs, resolution=160, batch=32, repeats=4, workers=workers)
        return len(ent_structs) / (time.perf_counter() - t0)

    rates = interleave({"madnas": madnas_rate, "entropy": entropy_rate}, rounds)
    res = {k: statistics.median(v) for k, v in rates.items()}
    lines = [
        "| score | candidates/s (median of 3 rounds) |",
        "|---|---|",
        f"| `madnas` (analytic, one process) | {res['madnas']:,.0f} |",
        f"| `entropy` (160 px, batch 32, 4 seeds, {workers} worker processes) | {res['entropy']:.3f} |",
        f"| ratio | {res['madnas'] / res['entropy']:,.0f}x |",
    ]
    return lines, res


def search_runs(iterations: int, seeds: list[int], png: Path) -> tuple[list[str], Path | None]:
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
                png,
                init_score=res.init.score,
                title=f"madnas search under T's budget (seed {seed})",
            )
            best_struct = res.structure
    if best_struct is not None:
        lines += ["", "Best structure of the first seed:", "", "```"]
        lines += [repr(b) for b in best_struct] + ["```"]
    return lines, curve_png


def latency_check(
    resolution: int,
    samples: int,
    threads: int,
    count: int = 20,
    rounds: int = 3,
    calib: int = 8,
) -> list[str]:
    """Table + calibration as ``damo-opt nas profile`` makes them, then ``count`` held-out
    structures: Spearman and mean relative error, uncalibrated and calibrated."""
    space = SearchSpace("k1kx")
    an, init = space.bind(resolve_structure("init"), resolution, True)
    table_genomes = [init, *sample_genomes(space, init, samples, seed=0)]
    keys = {op_key(op) for g in table_genomes for op in an.ops(g)}
    t0 = time.perf_counter()
    table = profile(keys, backend="openvino", threads=threads, repeats=10, rounds=rounds)
    t_profile = time.perf_counter() - t0
    # calibration structures: what `nas profile --seed 0 --calibrate 8` measures
    calib_genomes = sample_genomes(space, init, calib, seed=1, steps=40)
    # test structures: other random walks, none of them a calibration structure
    held_out: list = []
    for g in sample_genomes(space, init, 4 * count, seed=12345, steps=40):
        if g not in calib_genomes and g not in held_out:
            held_out.append(g)
        if len(held_out) == count:
            break
    # Calibration and test backbones are measured together, in the same interleaved rounds:
    # on this shared machine the load changes from minute to minute, and a calibration
    # measured under another load than the test would show up as a bias of the test.
    t0 = time.perf_counter()
    everything = measure_backbones(
        [join(an.bp, g) for g in calib_genomes + held_out],
        resolution,
        threads=threads,
        rounds=rounds,
    )
    t_measure = time.perf_counter() - t0
    table = calibrated(table, an, calib_genomes, everything[:calib])
    meas = everything[calib:]
    cal = table.calibration
    assert cal is not None
    raw, pred, missing, total_ops = [], [], 0, 0
    for g in held_out:
        ops = an.ops(g)
        _, _, miss = table.table_sum(ops)
        missing += miss
        total_ops += len(ops)
        raw.append(table.predict_uncalibrated(an, g))
        pred.append(table.predict(an, g))

    def signed(p: list[float]) -> float:
        return statistics.fmean((a - m) / m for a, m in zip(p, meas)) * 100

    return [
        f"Table: {len(keys)} convolutions of {samples} random k1kx structures + the initial one "
        f"(seed 0), OpenVINO CPU, {threads} thread, input {resolution} px with Focus, "
        f"inference precision {table.meta.get('inference_precision')}; profiling took "
        f"{t_profile:.0f} s. Calibration: {calib} more random structures (seed 1, walks of up "
        f"to 40 mutations) measured whole; fit (non-negative, relative "
        f"residuals): latency = {cal.scale:.3f} x sum(entries) + {cal.per_conv_ms:.4f} ms x convs "
        f"+ {cal.offset_ms:.3f} ms (error on its own {calib} structures "
        f"{(cal.mean_rel_error_uncalibrated or 0) * 100:.1f} % -> {(cal.mean_rel_error or 0) * 100:.1f} %). "
        f"`damo-opt nas profile --resolution {resolution} --samples {samples} --calibrate {calib} "
        f"--threads {threads} --repeats 10 --rounds {rounds}` profiles and calibrates on the same "
        "structures (measuring the calibration backbones on their own).",
        "",
        f"Test: {len(held_out)} *other* random structures (seed 12345, walks of up to 40 mutations, "
        "none of them a calibration structure); each whole backbone as the DAMO-YOLO builder "
        "makes it (deployed: RepConvs fused; SPP) converted with `ov.convert_model`; table "
        f"entries and backbones are each the fastest of {rounds} interleaved rounds' medians of "
        f"10 runs (calibration and test backbones measured in the same rounds, {t_measure:.0f} s). "
        f"{missing} of {total_ops} conv ops of the test structures "
        "were not in the table (estimated from the nearest entry).",
        "",
        "| metric | uncalibrated (overhead + sum of entries) | calibrated |",
        "|---|---|---|",
        f"| Spearman rank correlation (predicted vs measured) | {spearman(raw, meas):.3f} | "
        f"{spearman(pred, meas):.3f} |",
        f"| mean relative error | {mean_rel_error(raw, meas) * 100:.1f} % | "
        f"{mean_rel_error(pred, meas) * 100:.1f} % |",
        f"| mean signed error (bias) | {signed(raw):+.1f} % | {signed(pred):+.1f} % |",
        f"| measured latency range | {min(meas):.2f} – {max(meas):.2f} ms | |",
    ]


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iterations", type=int, default=500_000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--latency-resolution", type=int, default=320)
    ap.add_argument("--latency-samples", type=int, default=24)
    ap.add_argument("--latency-calibrate", type=int, default=8)
    ap.add_argument("--latency-rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--doc", default=str(DOCS / "nas.md"), help="Markdown file to write")
    args = ap.parse_args(argv)
    random.seed(0)
    out: list[str] = [
        "## MAE-NAS (`damo-opt nas`)",
        "",
        f"Command: `{command(__file__, argv)}`",
        "",
        machine_line(),
        "",
        "### Scores of DAMO-YOLO's backbones",
        "",
        "Structures from tinyvision/DAMO-YOLO (`damo_plugins/assets/`), scored with the Focus "
        "stem (12 input channels) and DAMO-YOLO's stage weights alpha = 0,0,1,1,16. Params and "
        "FLOPs are those of the deployed backbone the DAMO-YOLO builder makes (RepConvs fused; "
        "SPP in the last stage; CSP layout for M), computed analytically and equal to the "
        "integer to `sum(p.numel())` and `torch.utils.flop_counter` (2 x MACs) on it.",
        "",
    ]
    out += scores_table(args.workers)
    out += ["", "### Scoring speed", ""]
    lines, _ = speed(args.workers)
    out += lines
    out += ["", f"### {args.iterations:,}-candidate madnas search under DAMO-YOLO-T's budget", ""]
    seeds = [int(s) for s in args.seeds.split(",")]
    lines, png = search_runs(args.iterations, seeds, Path(args.doc).with_name("nas_curve.png"))
    out += lines
    if png is not None:
        out += ["", f"![search curve]({png.name})"]
    if not args.skip_latency:
        out += ["", "### Latency predictor (look-up table) against measured backbones", ""]
        out += latency_check(
            args.latency_resolution,
            args.latency_samples,
            args.threads,
            rounds=args.latency_rounds,
            calib=args.latency_calibrate,
        )
    text = "\n".join(out) + "\n"
    print(text)
    write_section(args.doc, text)


if __name__ == "__main__":
    main()
