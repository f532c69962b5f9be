"""``export``: PyTorch -> ONNX, verified in ONNX Runtime (the exporter: :mod:`damo_plugins.lib.onnx_export`).

The ``damo-opt export`` verb is also the one-shot deployment export (``yolo export``'s
analogue): fuse, export, convert to OpenVINO, optionally INT8 — a recipe of step *names*
run by the pipeline (this module imports no other plugin), each step verified, the final
files moved next to each other where ``-o`` says.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal

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
    dynamic: bool = Field(
        False, description="make batch, height and width dynamic (outputs: only what follows)"
    )
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
            dynamic_batch=cfg.dynamic_batch or cfg.dynamic,
            dynamic_size=cfg.dynamic,
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
    p = subparsers.add_parser(
        "export",
        help="export a model for deployment (ONNX or OpenVINO, optionally INT8), verified",
        description="Without --format: PyTorch -> one ONNX file, verified in ONNX Runtime. "
        "With --format onnx|openvino: fuse, export, convert, optionally INT8 (--int8 --data), "
        "each step verified; the model files and a report are written where -o says.",
    )
    add_model_args(p)
    p.add_argument("-o", "--output", help="model file to write (.onnx / .xml)")
    p.add_argument("--format", choices=("onnx", "openvino"), help="one-shot deployment export")
    p.add_argument("--int8", action="store_true", help="quantize (decode tail kept in float)")
    p.add_argument("--data", help="calibration images: a labelled data folder or image folder")
    p.add_argument("--half", action="store_true", help="FP16 weights (OpenVINO IR)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width")
    p.add_argument("--imgsz", type=int, help="square input size N (multiple of 32)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--opset", type=int, default=17, choices=range(16, 21), metavar="16..20")
    p.add_argument("--dynamic-batch", action="store_true")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript")
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """``damo-opt export MODEL``: the one-shot export with ``--format`` (or any of the
    deployment options), else the single ``export`` step into one ONNX file."""
    if args.format or args.int8 or args.half or args.dynamic or args.imgsz or args.json:
        return _cmd_oneshot(args)
    return _cmd_onnx(args)


def _cmd_onnx(args: argparse.Namespace) -> int:
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
    _say_if_untrained(args, art)
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


def _say_if_untrained(args: argparse.Namespace, art: ModelArtifact) -> None:
    """A bare builder name builds random weights: exporting one is legal (for latency or a
    pipeline dry run) but never what someone deploying wants without knowing it."""
    if art.path is None and not Path(str(args.model)).exists():
        log(
            f"note: '{args.model}' is a model name, not a checkpoint: exporting RANDOM weights "
            "(pass a .pt/.pth file to export a trained model)"
        )


def _fuses(art: ModelArtifact) -> bool:
    """Whether re-parameterization changes this model (branches to merge, BN to fold)."""
    from damo_plugins.lib.reparam import reparameterize

    _, rep = reparameterize(art.model)
    return bool(rep.repconv_deployed or rep.conv_bn_folded or rep.bn_before != rep.bn_after)


def _calibration(data: str) -> str:
    """The image folder to calibrate on: a labelled folder's train (else val) images, or the
    folder/file as given."""
    root = Path(data)
    if not root.exists():
        raise DamoError(f"--data {data}: no such file or folder")
    for split in ("train", "val"):
        if (root / split).is_dir():
            return str(root / split)
    return str(root)


#: step options of the one-shot recipe -> the ``damo-opt export`` flags that set them
ONESHOT_FLAGS = {
    "export.opset": "--opset",
    "export.dynamic_batch": "--dynamic-batch",
    "export.dynamic": "--dynamic",
    "export.exporter": "--exporter",
    "export.tolerance": "--tolerance",
    "convert.compress_to_fp16": "--half",
    "quantize.calibration": "--data",
}


def _cmd_oneshot(args: argparse.Namespace) -> int:
    """Fuse (when it changes the model), export, convert, INT8: one recipe of step names run
    by the pipeline into a temporary folder beside the destination; the final model files
    and the report then replace the destination's atomically (file by file, each a rename
    on the same file system)."""
    import contextlib
    import json
    import os
    import shutil
    import sys
    import tempfile

    from damo_plugins.core.pipeline import run

    fmt = args.format or "onnx"
    if args.half and fmt != "openvino":
        raise DamoError("--half stores FP16 weights in an OpenVINO IR", "add --format openvino")
    if args.int8 and not args.data:
        raise DamoError("--int8 needs --data (calibration images)", "e.g. --data coco/ or images/")
    if args.imgsz is not None and (args.imgsz < 32 or args.imgsz % 32):
        raise DamoError(f"--imgsz {args.imgsz}: must be a positive multiple of 32")
    if args.imgsz is not None:
        args.input_shape = [1, 3, args.imgsz, args.imgsz]
    art = model_from_args(args)
    if art.format != "torch":
        raise DamoError(f"export takes a PyTorch model, not {art.format}")
    suffix = ".xml" if fmt == "openvino" else ".onnx"
    stem = Path(str(args.model)).stem + ("_int8" if args.int8 else "")
    out = Path(args.output or f"{stem}{suffix}")
    if out.suffix.lower() != suffix:
        raise DamoError(f"-o {out}: a {fmt} model file ends with {suffix}")
    targets = [out, *([out.with_suffix(".bin")] if fmt == "openvino" else [])]
    report = out.with_name(out.stem + ".report.json")
    for t in targets:
        refuse_overwrite(t, args, art)
    _say_if_untrained(args, art)
    steps: list[Any] = []
    if _fuses(art):
        steps.append("reparam")
    steps.append(
        {
            "export": {
                "opset": args.opset,
                "dynamic_batch": args.dynamic_batch,
                "dynamic": args.dynamic,
                "exporter": args.exporter,
                "tolerance": args.tolerance,
            }
        }
    )
    if fmt == "openvino":
        steps.append({"convert": {"compress_to_fp16": bool(args.half)}})
    if args.int8:
        steps.append(
            {
                "quantize": {
                    "adapter": "nncf",
                    "target": fmt,
                    "calibration": _calibration(args.data),
                    "fuse": False,  # fused above when it changed anything
                }
            }
        )
    recipe = {"model": str(args.model), "steps": steps}
    names = " -> ".join(s if isinstance(s, str) else next(iter(s)) for s in steps)
    log(f"export: {names} ({fmt}{', FP16' if args.half else ''})")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        # backends print progress to stdout; stdout carries only the result (--json)
        from damo_plugins.core.verbs import errors_as_flags

        with contextlib.redirect_stdout(sys.stderr), errors_as_flags(ONESHOT_FLAGS):
            result = run(recipe, output=work / "run", model=art, force=True, log=log)
        final = Path(result.report["steps"][-1]["artifact"])
        sources = [final, *([final.with_suffix(".bin")] if fmt == "openvino" else [])]
        rep = dict(result.report)
        rep["output"] = str(out)
        rep["files"] = [str(t) for t in targets]
        tmp_report = work / "report.json"
        tmp_report.write_text(json.dumps(rep, indent=2, default=str) + "\n")
        for src, dst in zip(sources, targets):
            os.replace(src, dst)
        os.replace(tmp_report, report)
        if (work / "run" / "report.md").is_file():
            os.replace(work / "run" / "report.md", report.with_suffix(".md"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {
        "model": str(args.model),
        "format": fmt,
        "int8": bool(args.int8),
        "half": bool(args.half),
        "dynamic": bool(args.dynamic),
        "steps": [
            {
                "step": e["step"],
                "verification": (e.get("verification") or {}).get("message"),
                "seconds": e.get("seconds"),
            }
            for e in result.report["steps"][1:]
        ],
        "files": [str(t) for t in targets],
        "report": str(report),
    }
    if args.json:
        from damo_plugins.core.verbs import print_json

        print_json(summary)  # the one document on stdout (damo-opt --json convention)
    else:
        for t in targets:
            print(t)
    return 0
