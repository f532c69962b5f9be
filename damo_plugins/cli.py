"""``damo-opt``: the command line.

Built-in verbs live here; plugins add theirs through the ``damo_cli`` hook. Problems the user
can fix print one line on stderr and exit with status 2 (3 for a failed verification); a
traceback is shown only with ``--debug``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from damo_plugins import __version__
from damo_plugins.core.errors import DamoError
from damo_plugins.core.verbs import add_model_args, log, model_from_args, print_json

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


def cmd_run(args: argparse.Namespace) -> int:
    from damo_plugins.core.manager import get_manager
    from damo_plugins.core.pipeline import run
    from damo_plugins.core.recipe import check_chain, load_recipe

    mgr = get_manager()
    loaded = load_recipe(args.recipe, mgr)
    if args.dry_run:
        formats = check_chain(loaded)
        print(f"recipe {loaded.source} is valid: model {loaded.recipe.model} ({formats[0]})")
        for step, fmt in zip(loaded.steps, formats[1:]):
            print(
                f"  {step.index + 1:2d}. {step.name:<12} -> {fmt}  {step.config.model_dump(mode='json')}"
            )
        return 0
    res = run(
        loaded,
        manager=mgr,
        output=args.output,
        verify=not args.no_verify,
        force=args.force,
        log=log,
    )
    print(f"report: {res.output / 'report.md'}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    art = model_from_args(args)
    info = art.summary()
    if args.json:
        print_json(info)
        return 0
    from damo_plugins.core.report import human

    print(f"format: {info['format']}")
    print(f"params: {human(info['params'])} ({info['params']})")
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

    res = run_demo(output=args.output, force=args.force, quick=args.quick, log=log)
    print(f"report: {res.output / 'report.md'}")
    return 0


# -------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from damo_plugins.core.manager import get_manager

    parser = argparse.ArgumentParser(
        prog=PROG, description="Compress and deploy DAMO-YOLO-family models through plugins."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
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
    p.add_argument("--quick", action="store_true", help="smaller settings (used by the tests)")
    p.set_defaults(func=cmd_demo)

    get_manager().add_cli(sub)
    return parser


def _format_warning(
    message: Any, category: Any, filename: str, lineno: int, line: Any = None
) -> str:
    return f"{PROG}: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("DAMO_DEBUG") == "1"
    if not debug:
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
        return int(args.func(args) or 0)
    except DamoError as exc:
        if debug:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if debug:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        print(f"{PROG}: error: cannot access{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
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
