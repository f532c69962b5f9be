"""What a plugin needs to write a ``damo-opt`` verb (see the ``damo_cli`` hook).

Verbs are thin: parse, build a model or a one-step recipe, call the step runner or the
pipeline, print. These helpers keep the shared options (MODEL, ``--input-shape``, ``--arch``,
``--model-arg``) and output conventions identical across built-in and third-party verbs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
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


def pass_from_options(
    pass_cls: Any, options: dict[str, Any], flags: Mapping[str, str] | None = None
) -> Any:
    """``pass_cls`` configured from a verb's options, for :func:`~damo_plugins.core.runner.run_step`.

    A value the pass's ``Config`` refuses (e.g. ``--tolerance -1``) is one line naming the
    option, as the user typed it, instead of pydantic's report. ``flags`` maps a config key
    to its flag where the two are not spelled alike (``fold_bn`` -> ``--no-fold-bn``).
    """
    from pydantic import ValidationError

    try:
        return pass_cls(options)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = "_".join(str(k) for k in err.get("loc", ()))
        flag = (flags or {}).get(key) or f"--{key.replace('_', '-')}"
        raise DamoError(
            f"{flag}: {err.get('msg', 'invalid value')}", "see --help for the allowed values"
        ) from None


# ------------------------------------------------------------- errors in flag terms
#: top-level recipe keys -> what a verb's user typed (the options of :func:`add_model_args`)
MODEL_FLAGS = {
    "model": "MODEL",
    "input_shape": "--input-shape",
    "arch": "--arch",
    "model_args": "--model-arg",
}

# "<recipe>:3: steps[0].quantize.subset_size: msg", "<recipe>: steps[1]: msg", "<recipe>:1: arch: msg"
_RECIPE_ERROR = re.compile(
    r"^<recipe>(?::\d+)?: (?:steps\[\d+\](?:\.(?P<step>[\w-]+))?(?:\.(?P<key>[\w.\[\]]+))?"
    r"|(?P<top>[\w.\[\]]+)): (?P<msg>.*)$",
    re.S,
)


def flag_error(exc: DamoError, flags: Mapping[str, str]) -> DamoError:
    """``exc`` reworded in the terms of the command line a verb's user typed.

    A verb that builds a recipe from its flags runs it through the same loader as a recipe
    file, whose errors name places in a file the user never saw
    (``<recipe>:1: steps[0].quantize.subset_size: ...``). ``flags`` maps a step option
    (``subset_size``, or ``quantize.subset_size`` when two steps share a key name) to the
    flag that set it (``--subset``); top-level keys map through :data:`MODEL_FLAGS`. An
    option with no flag keeps its recipe name, without the invented location.
    """
    m = _RECIPE_ERROR.match(exc.message)
    if m is None:
        return exc
    step, key, top, msg = m.group("step"), m.group("key"), m.group("top"), m.group("msg")
    if top is not None:
        head = top.split(".")[0].split("[")[0]
        flag = MODEL_FLAGS.get(head) or flags.get(head)
        text = msg if head == "recipe" else f"{flag or top}: {msg}"
    elif key is not None:
        head = key.split(".")[0].split("[")[0]
        flag = flags.get(f"{step}.{head}") or flags.get(head)
        text = f"{flag}: {msg}" if flag else f"{step} option '{key}': {msg}"
    else:
        text = msg
    new = type(exc)(text, exc.hint)
    new.__cause__ = exc.__cause__
    return new


@contextlib.contextmanager
def errors_as_flags(flags: Mapping[str, str]) -> Iterator[None]:
    """Around a verb's one-step recipe: its errors name the flags (:func:`flag_error`)."""
    try:
        yield
    except DamoError as exc:
        raise flag_error(exc, flags) from exc


# ----------------------------------------------------------------------- --json
class _JsonCapture:
    """The one object a ``--json`` run prints; see :func:`json_stdout`."""

    def __init__(self) -> None:
        self.value: Any = None
        self.set = False


_CAPTURES: list[_JsonCapture] = []


def print_json(obj: Any) -> None:
    """Print a verb's result as JSON.

    Under ``--json`` (:func:`json_stdout`, which ``damo-opt`` wraps around every verb given
    ``--json``) the object is held and printed once the verb returns, after everything else
    the verb and its backends printed has gone to stderr: stdout then carries exactly one
    JSON document. Verbs must print their JSON through this function, never ``print``.
    """
    if _CAPTURES:
        _CAPTURES[-1].value, _CAPTURES[-1].set = obj, True
        return
    print(json.dumps(obj, indent=2, default=str))


def run_result_json(res: Any) -> dict[str, Any]:
    """What ``--json`` prints for a pipeline run (``run``, ``demo``, single-step verbs): the
    report, plus where the final model and the report files are (``files``)."""
    out = dict(res.report)
    out["files"] = {
        "model": str(res.artifact.path) if res.artifact.path else None,
        "report": str(res.output / "report.json"),
        "report_md": str(res.output / "report.md"),
    }
    return out


@contextlib.contextmanager
def json_stdout() -> Iterator[_JsonCapture]:
    """stdout reserved for one JSON document while the block runs.

    Everything printed meanwhile goes to stderr: Python's ``print`` (``sys.stdout`` is
    redirected) and, when stdout is a real file descriptor, native code writing to fd 1
    (OpenVINO and NNCF print from C++). The object given to :func:`print_json` is written
    to the real stdout when the block ends normally; on an error nothing is, so a
    consumer reading stdout sees either one document or nothing.
    """
    capture = _JsonCapture()
    saved_fd, fd = None, None
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.stdout.flush()
        fd = sys.stdout.fileno()
        err_fd = sys.stderr.fileno()
        saved_fd = os.dup(fd)
        os.dup2(err_fd, fd)
    real = sys.stdout
    _CAPTURES.append(capture)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield capture
    finally:
        _CAPTURES.remove(capture)
        if saved_fd is not None and fd is not None:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved_fd, fd)
            os.close(saved_fd)
    if capture.set:
        print(json.dumps(capture.value, indent=2, default=str), file=real, flush=True)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def refuse_overwrite(out: Path, args: argparse.Namespace, art: Any = None) -> None:
    if art is not None and art.path is not None and out.resolve() == Path(art.path).resolve():
        raise DamoError(f"refusing to overwrite the input model {out}", "choose another -o")
    if out.exists() and not getattr(args, "force", False):
        raise DamoError(f"{out} already exists", "use --force to overwrite it")


# ------------------------------------------------------------------------ --help
def shown_default(action: argparse.Action) -> bool:
    """Whether ``--help`` states this option's default: a value the user gets without
    typing anything (not ``None``, ``False``, an empty list, or a suppressed default)."""
    default = action.default
    if default is None or default is False or default is argparse.SUPPRESS:
        return False
    if isinstance(default, (list, tuple, dict, set)) and not default:
        return False
    return not isinstance(action, (argparse._HelpAction, argparse._VersionAction))


def default_text(default: Any) -> str:
    """A default as a user would type it: ``3,5`` for a tuple, ``1e-05`` for a float."""
    if isinstance(default, (list, tuple)):
        return ",".join(str(d) for d in default)
    return str(default)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help text that states every default a user gets without asking.

    ``argparse.ArgumentDefaultsHelpFormatter`` also prints ``(default: None)`` and
    ``(default: False)`` for every unset option and skips options without help text; this
    one adds ``(default: X)`` exactly where there is a value to state, help text or not,
    and leaves help that already says its default alone.
    """

    def _format_action(self, action: argparse.Action) -> str:
        if shown_default(action):
            help_text = action.help or ""
            said = re.search(
                r"default:?\s+" + re.escape(default_text(action.default)), help_text, re.I
            )
            if said is None:
                value = default_text(action.default).replace("%", "%%")
                action = argparse.Action(
                    option_strings=action.option_strings,
                    dest=action.dest,
                    nargs=action.nargs,
                    default=action.default,
                    type=action.type,
                    choices=action.choices,
                    required=action.required,
                    help=f"{help_text} (default: {value})".strip(),
                    metavar=action.metavar,
                )
        return super()._format_action(action)


class DamoArgumentParser(argparse.ArgumentParser):
    """``damo-opt``'s parser class: every verb's ``--help`` shows defaults.

    Subparsers are created with the parent's class, so a plugin's verb (and its own
    sub-verbs) gets the same formatter without asking for it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("formatter_class") in (None, argparse.HelpFormatter):
            kwargs["formatter_class"] = DefaultsHelpFormatter
        super().__init__(*args, **kwargs)
