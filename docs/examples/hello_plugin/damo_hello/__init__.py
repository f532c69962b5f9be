"""An example third-party plugin: a pass, a model, a verb and an event listener.

* the ``hello`` pass wraps a PyTorch model so its outputs are multiplied by ``scale``. With
  the default ``scale: 1.0`` the model computes the same thing and the default verification
  (output parity) would pass; any other scale changes the outputs, so this pass declares what
  it promises in its own ``verify``;
* the ``hello-net`` model builder (``damo-opt info hello-net``, ``model: hello-net``);
* the ``damo-opt hello MODEL`` verb, which applies the pass through the step runner;
* a ``damo_step_finished`` listener that logs every finished step as one JSON line to the
  file named by ``DAMO_HELLO_EVENTS`` (and does nothing when it is unset).

It imports only the public API (``damo_plugins``) and the verb helpers
(``damo_plugins.core.verbs``); torch is imported from ``damo_hello.nets`` inside the
functions that need it, so loading the plugin stays cheap.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import Field

from damo_plugins import (
    DamoError,
    ModelArtifact,
    Pass,
    PassConfig,
    PassContext,
    Verification,
    get_manager,
    hookimpl,
    parity,
    run_step,
)


class HelloConfig(PassConfig):
    scale: float = Field(1.0, description="factor applied to every output")


class HelloPass(Pass):
    name = "hello"
    accepts = ("torch",)
    Config = HelloConfig
    description = "example: multiply a model's outputs by a constant"

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        from damo_hello.nets import Scaled

        model = Scaled(copy.deepcopy(artifact.model), self.config.scale)
        ctx.extra["scale"] = self.config.scale
        out = artifact.derive(model=model)
        out.arch = None  # a wrapped model is no longer what the builder makes
        return out

    def verify(self, before: ModelArtifact, after: ModelArtifact, ctx: PassContext) -> Verification:
        feeds = before.example_inputs(seed=ctx.seed)
        expected = [o * self.config.scale for o in before.run(feeds)]
        return parity(expected, after.run(feeds), 1e-6)


@hookimpl
def damo_passes():
    return [HelloPass]


# --------------------------------------------------------------------- a model builder
def build_hello_net(*, channels: int = 4, num_classes: int = 3) -> Any:
    """``hello-net``: keyword-only arguments, each with a default, as builders must have.

    The arguments come from a recipe's ``model_args`` or ``--model-arg KEY=VALUE`` and are
    recorded in saved checkpoints, so they are plain JSON values and checked here.
    """
    for key, value in (("channels", channels), ("num_classes", num_classes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DamoError(f"hello-net: {key} must be a positive integer, not {value!r}")
    from damo_hello.nets import HelloNet

    return HelloNet(channels=channels, num_classes=num_classes)


# read without calling the builder: a recipe naming hello-net needs no input_shape
build_hello_net.default_input_shape = [1, 3, 32, 32]  # type: ignore[attr-defined]


@hookimpl
def damo_models() -> dict[str, Callable[..., Any]]:
    return {"hello-net": build_hello_net}


# ------------------------------------------------------------------------------ a verb
@hookimpl
def damo_cli(subparsers: argparse._SubParsersAction) -> None:
    from damo_plugins.core.verbs import add_model_args

    p = subparsers.add_parser("hello", help="example: scale a model's outputs and check it")
    add_model_args(p)  # MODEL, --input-shape, --arch, --model-arg: as every built-in verb
    p.add_argument("--scale", type=float, default=2.0, help="factor applied to every output")
    p.add_argument("--json", action="store_true", help="print the step's result as JSON")
    p.set_defaults(func=cmd_hello)


def cmd_hello(args: argparse.Namespace) -> int:
    """``damo-opt hello MODEL``: the ``hello`` step, run and verified as a recipe would."""
    from damo_plugins.core.verbs import log, model_from_args, print_json

    art = model_from_args(args)  # names, files and --model-arg, with the usual errors
    step = HelloPass({"scale": args.scale})
    with tempfile.TemporaryDirectory() as tmp:
        ctx = PassContext(manager=get_manager(), workdir=Path(tmp), log=log)
        result = run_step(step, art, ctx).raise_if_failed()  # failed check: exit status 3
    ver = result.verification
    log(f"hello: outputs x{args.scale} in {result.seconds:.3f}s; {ver.message if ver else ''}")
    if args.json:
        print_json(
            {
                "step": result.name,
                "config": result.config,
                "metrics": result.metrics,
                "verification": ver.to_dict() if ver else None,
            }
        )
    return 0


# --------------------------------------------------------------------- an event listener
@hookimpl
def damo_step_finished(step: str, metrics: Mapping[str, Any]) -> None:
    """Append ``{"step", "format", "passed", "artifact"}`` to ``$DAMO_HELLO_EVENTS``.

    A listener may take any subset of the hook's arguments (here not ``before``/``after``).
    If it raises, the run goes on and the failure is reported naming this plugin.
    """
    path = os.environ.get("DAMO_HELLO_EVENTS")
    if not path:
        return
    verification = metrics.get("verification") or {}
    line = {
        "step": step,
        "format": metrics.get("format"),
        "passed": verification.get("passed"),
        "artifact": metrics.get("artifact"),
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
