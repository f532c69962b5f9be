"""The ``nas`` plugin: MAE-NAS training-free scoring and budgeted search of backbones.

Adds ``damo-opt nas score | search | profile``. The work is done in
:mod:`damo_plugins.nas`; this module only parses options and prints results.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from damo_plugins.core.errors import DamoError
from damo_plugins.core.hookspecs import hookimpl

_SUFFIX = {"k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6, "g": 1e9, "G": 1e9, "t": 1e12, "T": 1e12}


def _number(text: str) -> float:
    """``7.6G``, ``2.5M``, ``500k`` or a plain number; positive."""
    t = text.strip().replace("_", "")
    mult = 1.0
    if t and t[-1] in _SUFFIX:
        mult, t = _SUFFIX[t[-1]], t[:-1]
    try:
        v = float(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a number like 7.6G, 2.5M or 1e9"
        ) from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be positive")
    return v


def _comma_list(kind: Callable[[str], Any], what: str) -> Callable[[str], tuple[Any, ...]]:
    """An argparse ``type`` for ``a,b,c``: every item through ``kind``; a bad item or an
    empty list is a one-line usage error naming ``what`` the list should hold."""

    def parse(text: str) -> tuple[Any, ...]:
        try:
            vals = tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"'{text}' is not a comma-separated list of {what}"
            ) from None
        if not vals:
            raise argparse.ArgumentTypeError("empty list")
        return vals

    return parse


_ints = _comma_list(int, "integers")
_floats = _comma_list(float, "numbers")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"'{text}' must be at least 1")
    return v


def _calibrate_count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if v != 0 and v < 3:
        raise argparse.ArgumentTypeError(
            f"'{text}': the calibration fits 3 coefficients, measure at least 3 backbones (or 0)"
        )
    return v


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- score
def score_structure(
    spec: str | Path,
    *,
    score: str = "madnas",
    resolution: int = 640,
    focus: bool = True,
    alpha: tuple[float, ...] | None = None,
    entropy_resolution: int = 160,
    entropy_batch: int = 32,
    repeats: int = 4,
    workers: int | None = None,
    latency_table: str | Path | None = None,
) -> dict[str, Any]:
    """What ``damo-opt nas score --json`` prints: madnas, [entropy], layers, params, flops."""
    from damo_plugins.nas.analysis import analyzer_for
    from damo_plugins.nas.score import DAMO_ALPHA, check_alpha, entropy_scores, madnas
    from damo_plugins.nas.structures import resolve_structure

    structure = resolve_structure(spec)
    alpha = alpha or DAMO_ALPHA
    an, genome = analyzer_for(structure, resolution, focus)
    check_alpha(an, alpha)
    m = an.metrics(genome)
    out: dict[str, Any] = {"madnas": madnas(an, genome, alpha)}
    if score == "entropy":
        out["entropy"] = entropy_scores(
            [structure],
            resolution=entropy_resolution,
            focus=focus,
            alpha=alpha,
            batch=entropy_batch,
            repeats=repeats,
            workers=workers,
        )[0]
    elif score != "madnas":
        raise DamoError(f"unknown score {score!r}", "one of madnas, entropy")
    out.update(layers=m.layers, params=m.params, flops=m.flops)
    if latency_table is not None:
        from damo_plugins.nas.latency import LatencyTable

        out["latency_ms"] = LatencyTable.load(latency_table).predict(an, genome)
    return out


def cmd_score(args: argparse.Namespace) -> int:
    res = score_structure(
        args.structure,
        score=args.score,
        resolution=args.resolution,
        focus=not args.no_focus,
        alpha=args.alpha,
        entropy_resolution=args.entropy_resolution,
        entropy_batch=args.entropy_batch,
        repeats=args.repeats,
        workers=args.workers,
        latency_table=args.latency_table,
    )
    if args.json:
        from damo_plugins.core.verbs import print_json

        print_json(res)
        return 0
    focus = "with Focus" if not args.no_focus else "no Focus"
    print(f"madnas   {res['madnas']:.4f}")
    if "entropy" in res:
        print(
            f"entropy  {res['entropy']:.4f}  (batch {args.entropy_batch}, {args.entropy_resolution} px, "
            f"{args.repeats} repeats)"
        )
    print(f"layers   {res['layers']}")
    print(f"params   {res['params'] / 1e6:.3f} M")
    print(f"flops    {res['flops'] / 1e9:.3f} G  (2 x MACs at {args.resolution} px, {focus})")
    if "latency_ms" in res:
        print(f"latency  {res['latency_ms']:.3f} ms  (predicted from {args.latency_table})")
    return 0


# --------------------------------------------------------------------------- search
def build_search(args: argparse.Namespace) -> Any:
    from damo_plugins.nas.analysis import analyzer_for
    from damo_plugins.nas.latency import LatencyTable
    from damo_plugins.nas.score import DAMO_ALPHA
    from damo_plugins.nas.search import Budgets, Search, SearchConfig
    from damo_plugins.nas.space import DAMO_CHANNEL_RANGES, SearchSpace
    from damo_plugins.nas.structures import resolve_structure

    focus = not args.no_focus
    layers, flops = args.layers, args.flops
    if args.budget_from:
        an, g = analyzer_for(resolve_structure(args.budget_from), args.resolution, focus)
        m = an.metrics(g)
        flops = flops or m.flops
        layers = layers or m.layers
    budgets = Budgets(
        layers=layers,
        params=int(args.params) if args.params else None,
        flops=int(flops) if flops else None,
        latency_ms=args.latency,
        max_feature=int(args.max_feature) if args.max_feature else None,
    )
    ranges = DAMO_CHANNEL_RANGES
    if args.channel_ranges:
        ranges = _parse_ranges(args.channel_ranges)
    space = SearchSpace(
        kind=args.space, kernels=args.kernels, channel_ranges=ranges, mutations=args.mutations
    )
    iterations = args.iterations or (500_000 if args.score == "madnas" else 256)
    if args.ray is not None and args.score == "madnas":
        _log("note: --ray applies to --score entropy; the analytic madnas score runs here")
    # entropy candidates cost seconds each: checkpoint often by default, so a killed driver
    # or a lost cluster loses little (madnas: every 50,000 as before)
    checkpoint_every = args.checkpoint_every or (50_000 if args.score == "madnas" else 32)
    config = SearchConfig(
        population=args.population,
        iterations=iterations,
        seed=args.seed,
        score=args.score,
        alpha=args.alpha or DAMO_ALPHA,
        resolution=args.resolution,
        focus=focus,
        checkpoint_every=checkpoint_every,
        workers=args.workers,
        ray=args.ray if args.score == "entropy" else None,
        batch=args.search_batch,
        entropy_resolution=args.entropy_resolution,
        entropy_batch=args.entropy_batch,
        entropy_repeats=args.repeats,
    )
    table = LatencyTable.load(args.latency_table) if args.latency_table else None
    profiled = table.meta.get("resolution") if table is not None else None
    if profiled is not None and profiled != args.resolution:
        # per-conv latencies depend on the feature-map sizes: a table measured at another
        # input size predicts the wrong latencies for every candidate
        if not getattr(args, "allow_resolution_mismatch", False):
            raise DamoError(
                f"--latency-table {args.latency_table} was profiled at {profiled} px, the search "
                f"runs at --resolution {args.resolution}",
                f"profile again with --resolution {args.resolution}, search at --resolution "
                f"{profiled}, or pass --allow-resolution-mismatch",
            )
        _log(
            f"warning: latency table profiled at {profiled} px used at {args.resolution} px "
            "(--allow-resolution-mismatch): predicted latencies are not trustworthy"
        )
    return Search(resolve_structure(args.init), space, budgets, config, latency=table)


def _parse_ranges(text: str) -> tuple[tuple[int, int] | None, ...]:
    """``-,-,64:128,-,128:256,256:512`` -> per-block ranges (``-`` = unconstrained)."""
    out: list[tuple[int, int] | None] = []
    for part in text.split(","):
        part = part.strip()
        if part in ("-", "", "none", "None"):
            out.append(None)
            continue
        try:
            lo, hi = (int(x) for x in part.split(":"))
        except ValueError:
            raise DamoError(
                f"--channel-ranges: bad range {part!r}", "write MIN:MAX or - per block"
            ) from None
        out.append((lo, hi))
    return tuple(out)


def cmd_search(args: argparse.Namespace) -> int:
    from damo_plugins.nas.search import write_outputs

    outdir = Path(args.output)
    resume = args.resume
    if resume is not None and Path(resume).is_dir():
        resume = Path(resume) / "checkpoint.json"
    if resume is None and (outdir / "checkpoint.json").exists() and not args.force:
        raise DamoError(
            f"{outdir} already holds a search",
            f"continue it with --resume {outdir / 'checkpoint.json'}, replace it with --force, or use another -o",
        )
    search = build_search(args)
    b = search.budgets
    _log(
        f"searching {search.config.iterations:,} candidates ({search.config.score}, space {args.space}); "
        f"budgets: " + ", ".join(f"{k}={v}" for k, v in vars(b).items() if v is not None)
    )
    result = search.run(
        outdir=outdir,
        resume=resume,
        progress=not args.no_progress and sys.stderr.isatty(),
        log=_log,
    )
    files = write_outputs(result, search, outdir, log=_log)
    files.update(_write_detector_recipe(outdir, files["structure"], args))
    best = result.best
    lat = f", predicted latency {best.latency_ms:.3f} ms" if best.latency_ms is not None else ""
    _log(
        f"best score {best.score:.4f} (initial {result.init.score:.4f}): {best.metrics.layers} layers, "
        f"{best.metrics.params / 1e6:.3f} M params, {best.metrics.flops / 1e9:.3f} GFLOPs{lat}; "
        f"{result.iterations:,} candidates in {result.seconds:.1f} s"
    )
    _log(f"train a detector on it: sh {files['train_command']} (recipe: {files['recipe']})")
    if args.json:
        from damo_plugins.core.verbs import print_json

        print_json(
            {
                "best": {
                    "score": best.score,
                    **best.metrics.as_dict(),
                    "latency_ms": best.latency_ms,
                },
                "initial_score": result.init.score,
                "iterations": result.iterations,
                "seconds": round(result.seconds, 3),
                "files": {k: str(v) for k, v in files.items()},
            }
        )
        return 0
    print(files["structure"])
    return 0


def _write_detector_recipe(
    outdir: Path, structure: Path, args: argparse.Namespace
) -> dict[str, Path]:
    """Next to the best structure: the exact ``damo-opt train`` command (``train.sh``) and a
    recipe (``detector.yaml``) that build a DAMO-YOLO detector on the found backbone.

    Both name the structure by absolute path (the builder records its content in every
    checkpoint, so moving the file later breaks nothing already trained) and the search's
    resolution as the image size, the size the structure's budgets were met at.
    """
    import shlex

    from damo_plugins.core.io import write_text

    backbone = Path(structure).resolve()
    res = int(args.resolution)
    head = ["damo-opt", "train", "--model", "damo-yolo", "--model-arg", f"backbone={backbone}"]
    tail = ["--img-size", str(res), "-o", str((outdir / "train").resolve())]
    text = (
        "#!/bin/sh\n# train a DAMO-YOLO detector on the searched backbone; DATA is a folder "
        "with train/ + train.json, val/ + val.json (or add --generate)\n"
        f'{shlex.join(head)} --data "${{DATA:-data}}" {shlex.join(tail)}\n'
    )
    recipe = (
        "# build (and deploy) a DAMO-YOLO detector on the searched backbone; train it first\n"
        "# with train.sh, then point model: at OUTPUT/best.pt\n"
        "model: damo-yolo\n"
        "model_args:\n"
        f"  backbone: {json.dumps(str(backbone))}\n"
        f"input_shape: [1, 3, {res}, {res}]\n"
        "steps:\n"
        "  - reparam\n"
        "  - export\n"
        "  - convert\n"
    )
    return {
        "train_command": write_text(outdir / "train.sh", text),
        "recipe": write_text(outdir / "detector.yaml", recipe),
    }


# --------------------------------------------------------------------------- profile
#: calibration structures are longer random walks than the table's samples: more varied
CALIBRATION_STEPS = 40


def cmd_profile(args: argparse.Namespace) -> int:
    from damo_plugins.nas.analysis import analyzer_for
    from damo_plugins.nas.latency import calibrate, op_key, profile, sample_genomes
    from damo_plugins.nas.space import SearchSpace
    from damo_plugins.nas.structures import resolve_structure

    focus = not args.no_focus
    space = SearchSpace(kind=args.space, kernels=args.kernels)
    an, init = space.bind(resolve_structure(args.init), args.resolution, focus)
    keys = {
        op_key(op)
        for g in [init, *sample_genomes(space, init, args.samples, args.seed)]
        for op in an.ops(g)
    }
    for spec in args.structure:
        a2, g2 = analyzer_for(resolve_structure(spec), args.resolution, focus)
        keys.update(op_key(op) for op in a2.ops(g2))
    from damo_plugins.core.progress import Progress

    # a bar on a terminal, a start and a done line in a log (not a "375/550" line per 25)
    bar = Progress(
        f"profiling {len(keys)} convolutions on {args.backend} {args.device}",
        unit="measurements",
    )

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.advance(done - bar.completed)

    with bar:
        table = profile(
            keys,
            backend=args.backend,
            device=args.device,
            threads=args.threads,
            repeats=args.repeats,
            rounds=args.rounds,
            progress=progress,
            meta={
                "resolution": args.resolution,
                "focus": focus,
                "space": args.space,
                "samples": args.samples,
                "seed": args.seed,
                "calibration_seed": args.seed + 1,
                "calibration_steps": CALIBRATION_STEPS,
            },
        )
    if args.calibrate:
        _log(f"measuring {args.calibrate} whole backbones to calibrate the table ...")
        genomes = sample_genomes(space, init, args.calibrate, args.seed + 1, CALIBRATION_STEPS)
        table = calibrate(table, an, genomes, repeats=args.repeats, rounds=args.rounds)
        cal = table.calibration
        assert cal is not None
        _log(
            f"calibrated: latency = {cal.scale:.3f} x table + {cal.per_conv_ms:.4f} ms x convs + "
            f"{cal.offset_ms:.3f} ms; mean relative error on these backbones "
            f"{(cal.mean_rel_error_uncalibrated or 0) * 100:.1f} % -> "
            f"{(cal.mean_rel_error or 0) * 100:.1f} %"
        )
    saved = table.save(args.output)
    if args.json:
        from damo_plugins.core.verbs import print_json

        cal = table.calibration
        print_json(
            {
                "table": str(saved),
                "convolutions": len(keys),
                "backend": args.backend,
                "device": args.device,
                "resolution": args.resolution,
                "calibration": None
                if cal is None
                else {
                    "scale": cal.scale,
                    "per_conv_ms": cal.per_conv_ms,
                    "offset_ms": cal.offset_ms,
                    "mean_rel_error": cal.mean_rel_error,
                },
            }
        )
        return 0
    print(saved)
    return 0


# --------------------------------------------------------------------------- wiring
def _common(p: argparse.ArgumentParser, entropy: bool = True) -> None:
    p.add_argument("--resolution", type=int, default=640, help="network input size (default 640)")
    p.add_argument(
        "--no-focus",
        action="store_true",
        help="score the bare structure, without DAMO-YOLO's Focus",
    )
    if entropy:
        p.add_argument(
            "--alpha", type=_floats, help="stage weights (default 0,0,1,1,16, DAMO-YOLO's)"
        )
        p.add_argument("--score", choices=("madnas", "entropy"), default="madnas")
        p.add_argument(
            "--entropy-resolution",
            type=_positive_int,
            default=160,
            help="input size of the entropy forward pass (default 160)",
        )
        p.add_argument("--entropy-batch", type=_positive_int, default=32)
        p.add_argument(
            "--repeats", type=_positive_int, default=4, help="entropy repeats (seeds), default 4"
        )
        p.add_argument(
            "--workers", type=int, help="entropy worker processes (default: CPU count, max 4)"
        )


@hookimpl
def damo_cli(subparsers: argparse._SubParsersAction) -> None:
    nas = subparsers.add_parser("nas", help="MAE-NAS: training-free score and search of backbones")
    sub = nas.add_subparsers(dest="nas_command", metavar="{score,search,profile}")
    sub.required = True

    p = sub.add_parser(
        "score", help="score a structure (madnas, optionally entropy), layers, params, FLOPs"
    )
    p.add_argument("structure", help="structure file (.json or DAMO-YOLO .txt) or t / s / m")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.add_argument(
        "--latency-table", help="also predict latency from this table (damo-opt nas profile)"
    )
    _common(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("search", help="evolutionary search under budgets")
    p.add_argument(
        "--init", default="init", help="initial structure ('init': MAE-NAS's DAMO-YOLO start)"
    )
    p.add_argument("--space", choices=("k1kx", "kxkx"), default="k1kx")
    p.add_argument("--kernels", type=_ints, default=(3, 5), help="allowed kernels (default 3,5)")
    p.add_argument(
        "--channel-ranges", help="per-block out ranges, e.g. -,-,64:128,-,128:256,256:512 (default)"
    )
    p.add_argument(
        "--mutations",
        type=_positive_int,
        default=2,
        help="mutations per child (default 2, upstream)",
    )
    p.add_argument("--layers", type=_positive_int, help="max conv layers")
    p.add_argument("--params", type=_number, help="max parameters, e.g. 3M")
    p.add_argument("--flops", type=_number, help="max FLOPs (2 x MACs at --resolution), e.g. 7.6G")
    p.add_argument(
        "--latency", type=_number, help="max predicted latency in ms (needs --latency-table)"
    )
    p.add_argument("--latency-table", help="latency table from 'damo-opt nas profile'")
    p.add_argument(
        "--allow-resolution-mismatch",
        action="store_true",
        help="use a latency table profiled at another --resolution (predictions are then off)",
    )
    p.add_argument(
        "--max-feature", type=_number, help="max feature-map elements of any conv (in + out)"
    )
    p.add_argument(
        "--budget-from", help="take FLOPs and layer budgets from this structure (e.g. t)"
    )
    p.add_argument("--population", type=_positive_int, default=512)
    p.add_argument(
        "--iterations", type=_positive_int, help="candidates (default 500000 madnas, 256 entropy)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        help="candidates between checkpoints (default 50000 madnas, 32 entropy)",
    )
    p.add_argument(
        "--search-batch",
        type=_positive_int,
        default=8,
        help="entropy: children scored together (default 8); each is --repeats tasks, so "
        "raise it to keep a cluster's CPUs busy (it changes the search path, not equality "
        "between local and Ray)",
    )
    p.add_argument(
        "--ray",
        metavar="local|auto|ADDRESS",
        help="score entropy candidates as Ray tasks: 'local' (a private Ray instance for this "
        "run), 'auto' (the cluster Ray finds) or a cluster address; default: $DAMO_RAY_ADDRESS, "
        "else local worker processes. Needs damo-plugins[ray]",
    )
    p.add_argument("--resume", help="checkpoint.json (or its folder) of an interrupted search")
    p.add_argument("-o", "--output", default="runs/nas", help="output folder (default runs/nas)")
    p.add_argument(
        "--force", action="store_true", help="overwrite a finished search in the output folder"
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the best structure and files as JSON")
    _common(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "profile", help="measure conv latencies of a search space into a table (JSON)"
    )
    p.add_argument("--backend", choices=("openvino", "torch"), default="openvino")
    p.add_argument("--device", default="CPU")
    p.add_argument(
        "--threads", type=_positive_int, help="inference threads (default: the runtime's)"
    )
    p.add_argument("--space", choices=("k1kx", "kxkx"), default="k1kx")
    p.add_argument("--kernels", type=_ints, default=(3, 5))
    p.add_argument("--init", default="init", help="structure the samples start from")
    p.add_argument(
        "--samples", type=int, default=64, help="random structures whose convs are measured"
    )
    p.add_argument(
        "--structure", action="append", default=[], help="also measure this structure's convs"
    )
    p.add_argument(
        "--calibrate",
        type=_calibrate_count,
        default=8,
        help="whole random backbones to measure and fit the table's calibration on "
        "(default 8; 0: none, the prediction is the plain sum of entries)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=_positive_int, default=15)
    p.add_argument(
        "--rounds",
        type=_positive_int,
        default=1,
        help="interleaved measurement rounds, fastest kept (default 1; more on a busy machine)",
    )
    p.add_argument("-o", "--output", default="latency.json")
    p.add_argument("--json", action="store_true", help="print the table's summary as JSON")
    _common(p, entropy=False)
    p.set_defaults(func=cmd_profile)
