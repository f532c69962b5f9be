"""``damo-opt``: the command line.

Built-in verbs live here; plugins add theirs through the ``damo_cli`` hook. Problems the user
can fix print one line on stderr and exit with status 2 (3 for a failed verification); a
traceback is shown only with ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from damo_plugins import __version__
from damo_plugins.core.errors import DamoError
from damo_plugins.core.progress import is_verbose, quiet_backends, set_verbose
from damo_plugins.core.verbs import (
    DamoArgumentParser,
    add_model_args,
    json_stdout,
    log,
    print_json,
    run_result_json,
)

PROG = "damo-opt"


# ------------------------------------------------------------------------- verbs
def cmd_plugins(args: argparse.Namespace) -> int:
    from damo_plugins.core.manager import get_manager

    mgr = get_manager()
    rows = []
    for c in mgr.contributions():
        rows.append(
            {
                "name": c.name,
                "kind": c.kind,
                "distribution": c.plugin.distribution,
                "version": c.plugin.version,
                "entry_point": c.plugin.entry_point,
            }
        )
    contributing = {c.plugin.name for c in mgr.contributions()}
    for name, info in sorted(mgr.info.items()):
        if name not in contributing:
            rows.append(
                {
                    "name": name,
                    "kind": "plugin",
                    "distribution": info.distribution,
                    "version": info.version,
                    "entry_point": info.entry_point,
                }
            )
    if args.json:
        print_json(rows)
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="damo-plugins: installed plugins")
    for col in ("name", "kind", "distribution", "version", "entry point"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["kind"], r["distribution"], r["version"], r["entry_point"])
    Console(width=max(120, _term_width())).print(table)
    for name, why in sorted(mgr.failures.items()):
        print(f"{PROG}: warning: plugin '{name}' not loaded: {why}", file=sys.stderr)
    return 0


def _term_width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 120


_MLFLOW_HELP = (
    "track the run in MLflow (needs damo-plugins-mlflow): the tracking store URI, "
    "default MLFLOW_TRACKING_URI or MLflow's own default"
)


def _track(args: argparse.Namespace) -> None:
    """``--mlflow [URI]``: turn experiment tracking on for this process.

    Tracking is an integration listening to pipeline events, not a core feature, so the
    option only sets ``DAMO_MLFLOW`` for the integration to read. Without the integration
    the option would silently do nothing, so that is an error instead.
    """
    if getattr(args, "mlflow", None) is None:
        return
    from damo_plugins.core.manager import get_manager

    if "mlflow" not in get_manager().info:
        raise DamoError(
            "--mlflow needs the MLflow integration (plugin 'mlflow'), "
            "which is not installed or is disabled",
            "pip install -e integrations/mlflow",
        )
    os.environ["DAMO_MLFLOW"] = args.mlflow


RECIPE_SUFFIXES = (".yaml", ".yml", ".json")


def _bare_mlflow(argv: list[str]) -> list[str]:
    """``run --mlflow recipe.yaml``: a recipe file right after ``--mlflow`` is the recipe, not
    a tracking URI (``nargs='?'`` would take it as the URI and then miss the recipe). No
    tracking store is a ``.yaml``/``.yml``/``.json`` file, so the suffix decides."""
    out = list(argv)
    for i, tok in enumerate(out[:-1]):
        if tok == "--mlflow" and os.path.splitext(out[i + 1])[1].lower() in RECIPE_SUFFIXES:
            out[i] = "--mlflow=on"
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from damo_plugins.core.manager import get_manager
    from damo_plugins.core.pipeline import run
    from damo_plugins.core.recipe import check_chain, load_recipe

    mgr = get_manager()
    loaded = load_recipe(args.recipe, mgr)
    if args.dry_run:
        formats = check_chain(loaded)
        if args.json:
            print_json(
                {
                    "recipe": loaded.source,
                    "valid": True,
                    "model": loaded.recipe.model,
                    "format": formats[0],
                    "output": loaded.recipe.output,
                    "steps": [
                        {
                            "index": step.index + 1,
                            "step": step.name,
                            "format": fmt,
                            "config": step.config.model_dump(mode="json"),
                        }
                        for step, fmt in zip(loaded.steps, formats[1:])
                    ],
                }
            )
            return 0
        print(f"recipe {loaded.source} is valid: model {loaded.recipe.model} ({formats[0]})")
        for step, fmt in zip(loaded.steps, formats[1:]):
            print(
                f"  {step.index + 1:2d}. {step.name:<12} -> {fmt}  {step.config.model_dump(mode='json')}"
            )
        return 0
    _track(args)
    res = run(
        loaded,
        manager=mgr,
        output=args.output,
        verify=not args.no_verify,
        force=args.force,
        log=log,
    )
    return _print_run(args, res)


def _print_run(args: argparse.Namespace, res: Any) -> int:
    """What ``run`` and ``demo`` print for a finished pipeline: its result as JSON with
    ``--json``, else where its report is."""
    if args.json:
        print_json(run_result_json(res))
    else:
        print(f"report: {res.output / 'report.md'}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from damo_plugins.core.artifact import describe
    from damo_plugins.core.manager import get_manager
    from damo_plugins.core.verbs import parse_model_args

    # describe() counts on the meta device: a registered model is never initialized or run
    info = describe(
        args.model,
        manager=get_manager(),
        input_shape=args.input_shape,
        model_args=parse_model_args(args.model_arg),
        arch=args.arch,
    )
    if args.json:
        print_json(info)
        return 0
    from damo_plugins.core.report import human

    print(f"format: {info['format']}")
    print(f"params: {human(info['params'])} ({info['params']})")
    if info["format"] != "torch":
        # why an export's count differs from its PyTorch model's
        print(
            "        (the graph's weight constants: BatchNorm folded into convolutions, fixed"
            " tensors such as anchor grids included; PyTorch counts learnable parameters)"
        )
    print(f"FLOPs:  {human(info['flops'])}" + (f" ({info['flops']})" if info["flops"] else ""))
    for kind in ("inputs", "outputs"):
        for t in info[kind]:
            print(f"{kind[:-1]:<7} {t['name']}: {t['dtype']} {t['shape']}")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from damo_plugins.core.manager import get_manager

    rows = [c.obj.describe() for c in get_manager().contributions("adapter")]
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no adapters installed (pip install -e adapters/<name>)")
    for r in rows:
        version = r["version"] or "NOT INSTALLED"
        print(
            f"{r['adapter']:<12} {r['backend']} {version}: devices {', '.join(r['devices']) or '-'}; "
            f"can {', '.join(r['capabilities']) or '-'}"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from damo_plugins.demo import run_demo

    _track(args)
    res = run_demo(output=args.output, force=args.force, quick=args.quick, full=args.full, log=log)
    return _print_run(args, res)


def cmd_optimize(args: argparse.Namespace) -> int:
    from damo_plugins.optimize.api import optimize

    res = optimize(
        args.model,
        args.data,
        device=args.device,
        max_drop=args.max_drop,
        imgsz=args.imgsz,
        time_budget=args.time_budget,
        resume=args.resume,
        no_accuracy=args.no_accuracy,
        output=args.output,
        space=args.space,
        force=args.force,
        log=log,
        workers=args.workers,
        ray=args.ray,
        device_resource=args.device_resource,
    )
    if args.json:
        print_json(res.report)
    else:
        print(f"report: {res.output / 'optimize.md'}")
        if res.best is not None:
            print(f"best:   {res.output / 'best'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from damo_plugins.optimize.compare import compare, table

    rows = compare(
        args.models,
        args.data,
        device=args.device,
        runtime=args.runtime,
        precision=args.precision,
        imgsz=args.imgsz,
        log=log,
    )
    if args.json:
        print_json(rows)
    else:
        print(table(rows))
    return 0


# -------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from damo_plugins.core.manager import get_manager

    # every verb's --help states its defaults (subparsers inherit the parser class)
    parser = DamoArgumentParser(
        prog=PROG, description="Compress and deploy DAMO-YOLO-family models through plugins."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show backends' own progress bars, log lines and warnings (held back otherwise)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("plugins", help="list installed plugins and what they provide")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("run", help="run a recipe (YAML/JSON)")
    p.add_argument("recipe")
    p.add_argument("-o", "--output", help="output folder (default: the recipe's, or runs/<name>)")
    p.add_argument("--dry-run", action="store_true", help="validate the recipe and show the steps")
    p.add_argument("--no-verify", action="store_true", help="skip each step's verification")
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    p.add_argument("--mlflow", nargs="?", const="on", metavar="URI", help=_MLFLOW_HELP)
    p.add_argument("--json", action="store_true", help="print the report (or the plan) as JSON")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("info", help="format, inputs/outputs, params and FLOPs of a model")
    add_model_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("devices", help="what each adapter can target on this machine")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("demo", help="run the end-to-end demo on the embedded model")
    p.add_argument("-o", "--output", default="runs/demo")
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller settings (used by the tests)")
    size.add_argument(
        "--full",
        action="store_true",
        help="re-create the shipped pruned model: prune + distilled recovery (~1.5 h of CPU)",
    )
    p.add_argument("--mlflow", nargs="?", const="on", metavar="URI", help=_MLFLOW_HELP)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "optimize", help="find the fastest model for a device within an accuracy budget"
    )
    p.add_argument("model", help="a .pt checkpoint, a registered model name, .onnx or .xml")
    p.add_argument(
        "--data", required=True, help="COCO folder, DATA dir, .json, dataset .yaml, or synthetic"
    )
    p.add_argument("--device", default="CPU", help="target device (default CPU)")
    p.add_argument(
        "--max-drop",
        type=float,
        default=0.01,
        help="allowed mAP@[.5:.95] loss as a fraction (0.01 = 1 point)",
    )
    p.add_argument("--imgsz", type=int, help="square input size N (input 1,3,N,N)")
    p.add_argument("--time-budget", help="stop starting new candidates after this long (30m, 2h)")
    p.add_argument("--space", help="candidate space file (YAML/JSON)")
    p.add_argument("--resume", action="store_true", help="reuse the cached candidates of -o")
    p.add_argument("--no-accuracy", action="store_true", help="latency only (unlabelled data)")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="build and evaluate candidates in N local processes (default: one after the "
        "other in this process); latency is always timed alone on the device",
    )
    p.add_argument(
        "--ray",
        metavar="local|auto|ADDRESS",
        help="build and evaluate candidates as Ray tasks: 'local' (a private Ray instance), "
        "'auto' or a cluster address; default: $DAMO_RAY_ADDRESS, else --workers",
    )
    p.add_argument(
        "--device-resource",
        metavar="NAME",
        help="with --ray: time latency on the Ray node declaring this custom resource "
        "(ray start --resources '{\"NAME\": 1}'), not on this machine",
    )
    p.add_argument("-o", "--output", default="runs/optimize", help="output folder")
    p.add_argument("--force", action="store_true", help="replace an earlier run's outputs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("compare", help="params, FLOPs, size, mAP and latency of several models")
    p.add_argument("models", nargs="+", metavar="MODEL", help="models in any format")
    p.add_argument("--data", help="labelled data for mAP (omit: latency only)")
    p.add_argument("--device", default="CPU")
    p.add_argument("--runtime", choices=("openvino", "onnxruntime", "torch"), default="openvino")
    p.add_argument("--precision", default="f32", help="OpenVINO precision (f32, bf16, f16)")
    p.add_argument("--imgsz", type=int, help="square input size N")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)

    get_manager().add_cli(sub)
    return parser


def _format_warning(
    message: Any, category: Any, filename: str, lineno: int, line: Any = None
) -> str:
    return f"{PROG}: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is a global switch wherever it is typed (before or after the verb)
    debug = "--debug" in argv or os.environ.get("DAMO_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"] + (["--debug"] if "--debug" in argv else [])
    if "--debug" in argv:
        argv = ["--debug", *argv[:-1]]
    # --verbose (anywhere, or DAMO_VERBOSE=1; implied by --debug): backends' progress bars,
    # log lines and warnings are shown instead of held back (core/progress.py)
    verbose = "--verbose" in argv or is_verbose() or debug
    argv = _bare_mlflow([a for a in argv if a != "--verbose"])
    set_verbose(verbose)
    if not verbose:
        import logging

        # Backends log internal notes (torch.export, NNCF, INC) that mean nothing to a user.
        for name in ("torch", "nncf", "neural_compressor", "onnxscript"):
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.formatwarning = _format_warning  # type: ignore[assignment]
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        with quiet_backends(verbose):
            if getattr(args, "json", False):
                # stdout carries exactly one JSON document; the rest goes to stderr
                with json_stdout():
                    return int(args.func(args) or 0)
            return int(args.func(args) or 0)
    except DamoError as exc:
        if debug:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # `damo-opt info ... | head`: the reader left; not an error. Point stdout at devnull so
        # the interpreter's final flush does not complain either.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        if debug:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        print(f"{PROG}: error: cannot access{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        # SIGTERM arrives as Terminated (a KeyboardInterrupt): 128 + signal number, as shells do
        terminated = type(exc).__name__ == "Terminated"
        print(f"{PROG}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as exc:
        if debug:
            raise
        print(
            f"{PROG}: internal error: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''} "
            "(this is a bug; run with --debug for the traceback and report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
