"""``export``: PyTorch -> ONNX, verified in ONNX Runtime (the exporter: :mod:`damo_plugins.lib.onnx_export`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from pydantic import Field

from damo_plugins.core.artifact import ModelArtifact, onnx_artifact
from damo_plugins.core.errors import DamoError
from damo_plugins.core.hookspecs import hookimpl
from damo_plugins.core.passes import Pass, PassConfig, PassContext
from damo_plugins.core.verbs import add_model_args, log, model_from_args, refuse_overwrite
from damo_plugins.lib.onnx_export import export_onnx


class ExportConfig(PassConfig):
    opset: int = Field(17, ge=16, le=20, description="ONNX opset (16–20)")
    dynamic_batch: bool = Field(False, description="make the batch axis dynamic")
    exporter: Literal["torchscript", "dynamo"] = "torchscript"
    tolerance: float = Field(1e-4, gt=0, description="max error relative to output scale")


class ExportPass(Pass):
    """Export a PyTorch model to ONNX."""

    name = "export"
    accepts = ("torch",)
    produces = "onnx"
    Config = ExportConfig
    description = "PyTorch -> ONNX (opset 16–20), verified in ONNX Runtime"

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        cfg: ExportConfig = self.config  # type: ignore[assignment]
        proto = export_onnx(
            artifact,
            opset=cfg.opset,
            dynamic_batch=cfg.dynamic_batch,
            exporter=cfg.exporter,
            seed=ctx.seed,
        )
        out = onnx_artifact(proto, provenance=list(artifact.provenance), meta=dict(artifact.meta))
        out.meta["opset"] = cfg.opset
        out.meta["torch_arch"] = artifact.arch
        return out


@hookimpl
def damo_passes() -> list[type[Pass]]:
    return [ExportPass]


@hookimpl
def damo_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a PyTorch model to ONNX, verified in ONNX Runtime")
    add_model_args(p)
    p.add_argument("-o", "--output", help="ONNX file to write")
    p.add_argument("--opset", type=int, default=17, choices=range(16, 21), metavar="16..20")
    p.add_argument("--dynamic-batch", action="store_true")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript")
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """``damo-opt export MODEL -o FILE``: the ``export`` step through the step runner (export,
    then parity in ONNX Runtime), written to FILE only when it passed."""
    from damo_plugins.core.io import atomic_path
    from damo_plugins.core.manager import get_manager
    from damo_plugins.core.runner import run_step
    from damo_plugins.core.verbs import pass_from_options

    options = {"opset": args.opset, "dynamic_batch": args.dynamic_batch}
    step = pass_from_options(
        ExportPass, {**options, "exporter": args.exporter, "tolerance": args.tolerance}
    )
    art = model_from_args(args)
    if art.format != "torch":
        raise DamoError(f"export takes a PyTorch model, not {art.format}")
    out = Path(args.output or f"{Path(str(args.model)).stem}.onnx")
    refuse_overwrite(out, args, art)
    log(f"exporting to ONNX (opset {args.opset}) ...")
    # the pass writes nothing: the folder is only where a pass may keep scratch files
    ctx = PassContext(manager=get_manager(), workdir=out.parent, log=log)
    res = run_step(step, art, ctx)
    assert res.verification is not None  # ctx.verify is true
    log(f"ONNX Runtime vs PyTorch: {res.verification.message}")
    if not res.passed:
        raise DamoError(
            f"exported model does not match PyTorch: {res.verification.message}",
            "nothing was written",
        )
    with atomic_path(out) as tmp:
        tmp.write_bytes(res.artifact.model.SerializeToString())
    print(out)
    return 0
