"""What a plugin needs to write a ``damo-opt`` verb (see the ``damo_cli`` hook).

Verbs are thin: parse, build a model or a one-step recipe, call the step runner or the
pipeline, print. These helpers keep the shared options (MODEL, ``--input-shape``, ``--arch``,
``--model-arg``) and output conventions identical across built-in and third-party verbs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from damo_plugins.core.errors import DamoError


def shape_arg(text: str) -> list[int]:
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
    p.add_argument("--input-shape", type=shape_arg, help="input shape, e.g. 1,3,640,640")
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


def model_from_args(args: argparse.Namespace) -> Any:
    from damo_plugins.core.artifact import load_model
    from damo_plugins.core.manager import get_manager

    kwargs = parse_model_args(args.model_arg)
    return load_model(
        args.model,
        manager=get_manager(),
        input_shape=args.input_shape,
        model_args=kwargs,
        arch=args.arch,
    )


def pass_from_options(pass_cls: Any, options: dict[str, Any]) -> Any:
    """``pass_cls`` configured from a verb's options, for :func:`~damo_plugins.core.runner.run_step`.

    A value the pass's ``Config`` refuses (e.g. ``--tolerance -1``) is one line naming the
    option, as the user typed it, instead of pydantic's report.
    """
    from pydantic import ValidationError

    try:
        return pass_cls(options)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = "_".join(str(k) for k in err.get("loc", ()))
        raise DamoError(
            f"--{key.replace('_', '-')}: {err.get('msg', 'invalid value')}",
            "see --help for the allowed values",
        ) from None


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def refuse_overwrite(out: Path, args: argparse.Namespace, art: Any = None) -> None:
    if art is not None and art.path is not None and out.resolve() == Path(art.path).resolve():
        raise DamoError(f"refusing to overwrite the input model {out}", "choose another -o")
    if out.exists() and not getattr(args, "force", False):
        raise DamoError(f"{out} already exists", "use --force to overwrite it")
