"""``damo-opt``: the command line.

Built-in verbs live here; plugins add theirs through the ``damo_cli`` hook. Problems the user
can fix print one line on stderr and exit with status 2 (3 for a failed verification); a
traceback is shown only with ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from damo_plugins import __version__
from damo_plugins.errors import DamoError

PROG = "damo-opt"


def _shape(text: str) -> list[int]:
    try:
        dims = [int(d) for d in text.replace("x", ",").split(",") if d.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a shape like 1,3,640,640") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"'{text}' is not a shape of positive integers")
    return dims


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The options every verb taking a MODEL shares."""
    p.add_argument(
        "model", help="a registered model (e.g. damo-yolo-s) or a .pt/.pth/.onnx/.xml file"
    )
    p.add_argument("--input-shape", type=_shape, help="input shape, e.g. 1,3,640,640")
    p.add_argument("--arch", help="builder for a checkpoint holding weights only")
    p.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="builder argument (value parsed as JSON when possible), repeatable",
    )


def parse_model_args(items: Sequence[str]) -> dict[str, Any]:
    """``--model-arg KEY=VALUE`` options -> builder kwargs (values parsed as JSON if they can be)."""
    kwargs: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise DamoError(f"--model-arg '{item}' is not KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            kwargs[key] = json.loads(value)
        except ValueError:
            kwargs[key] = value
    return kwargs


def load_model_from_args(args: argparse.Namespace) -> Any:
    from damo_plugins.artifact import load_model
    from damo_plugins.manager import get_manager

    kwargs = parse_model_args(args.model_arg)
    return load_model(
        args.model,
        manager=get_manager(),
        input_shape=args.input_shape,
        model_args=kwargs,
        arch=args.arch,
    )


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ------------------------------------------------------------------------- verbs
def cmd_plugins(args: argparse.Namespace) -> int:
    from damo_plugins.manager import get_manager

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
        _print_json(rows)
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
    from damo_plugins.manager import get_manager
    from damo_plugins.pipeline import run
    from damo_plugins.recipe import check_chain, load_recipe

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
        log=_log,
    )
    print(f"report: {res.output / 'report.md'}")
    return 0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_export(args: argparse.Namespace) -> int:
    from damo_plugins.artifact import onnx_artifact
    from damo_plugins.io import atomic_path
    from damo_plugins.passes.export import export_onnx
    from damo_plugins.verify import parity

    art = load_model_from_args(args)
    if art.format != "torch":
        raise DamoError(f"export takes a PyTorch model, not {art.format}")
    out = Path(args.output or f"{Path(str(args.model)).stem}.onnx")
    _refuse_overwrite(out, args, art)
    _log(f"exporting to ONNX (opset {args.opset}) ...")
    proto = export_onnx(
        art, opset=args.opset, dynamic_batch=args.dynamic_batch, exporter=args.exporter
    )
    feeds = art.example_inputs()
    ver = parity(art.run(feeds), onnx_artifact(proto).run(feeds), args.tolerance)
    _log(f"ONNX Runtime vs PyTorch: {ver.message}")
    if not ver.passed:
        raise DamoError(
            f"exported model does not match PyTorch: {ver.message}", "nothing was written"
        )
    with atomic_path(out) as tmp:
        tmp.write_bytes(proto.SerializeToString())
    print(out)
    return 0


def _refuse_overwrite(out: Path, args: argparse.Namespace, art: Any = None) -> None:
    if art is not None and art.path is not None and out.resolve() == Path(art.path).resolve():
        raise DamoError(f"refusing to overwrite the input model {out}", "choose another -o")
    if out.exists() and not getattr(args, "force", False):
        raise DamoError(f"{out} already exists", "use --force to overwrite it")


def cmd_info(args: argparse.Namespace) -> int:
    art = load_model_from_args(args)
    info = art.summary()
    if args.json:
        _print_json(info)
        return 0
    from damo_plugins.report import human

    print(f"format: {info['format']}")
    print(f"params: {human(info['params'])} ({info['params']})")
    print(f"FLOPs:  {human(info['flops'])}" + (f" ({info['flops']})" if info["flops"] else ""))
    for kind in ("inputs", "outputs"):
        for t in info[kind]:
            print(f"{kind[:-1]:<7} {t['name']}: {t['dtype']} {t['shape']}")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from damo_plugins.manager import get_manager

    rows = [c.obj.describe() for c in get_manager().contributions("adapter")]
    if args.json:
        _print_json(rows)
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

    res = run_demo(output=args.output, force=args.force, quick=args.quick, log=_log)
    print(f"report: {res.output / 'report.md'}")
    return 0


# -------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from damo_plugins.manager import get_manager

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

    p = sub.add_parser("export", help="export a PyTorch model to ONNX, verified in ONNX Runtime")
    add_model_args(p)
    p.add_argument("-o", "--output", help="ONNX file to write")
    p.add_argument("--opset", type=int, default=17, choices=range(16, 21), metavar="16..20")
    p.add_argument("--dynamic-batch", action="store_true")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript")
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_export)

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
