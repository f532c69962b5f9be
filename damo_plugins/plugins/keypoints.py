"""The ``keypoints`` plugin: Detectron2-style keypoint post-processing made exportable.

Thin entry point; the work lives in :mod:`damo_plugins.keypoints`. Provides the pass
``keypoints`` (PyTorch keypoint model -> ONNX with a dynamic number of ROIs, verified in ONNX
Runtime and OpenVINO), the model ``keypoint-rcnn-head`` and ``damo-opt keypoints export``.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from pydantic import Field

from damo_plugins.core.artifact import ModelArtifact, onnx_artifact
from damo_plugins.core.errors import DamoError
from damo_plugins.core.hookspecs import hookimpl
from damo_plugins.core.lazy import lazy
from damo_plugins.core.passes import Pass, PassConfig, PassContext
from damo_plugins.core.verify import Verification


class KeypointsConfig(PassConfig):
    opset: int = Field(17, ge=16, le=18, description="ONNX opset (16–18)")
    method: Literal["vectorized", "pruned", "loop"] = Field(
        "vectorized", description="post-processing form"
    )
    verify_rois: list[int] = Field([0, 1, 4, 100], description="ROI counts checked")
    backends: list[Literal["onnxruntime", "openvino"]] = ["onnxruntime", "openvino"]
    min_agreement: float = Field(1.0, ge=0, le=1, description="argmax agreement required")
    max_px: float = Field(1e-2, gt=0, description="max |dx|, |dy| (px) on agreeing keypoints")


class KeypointsPass(Pass):
    """Export a keypoint model with the exportable ``heatmaps_to_keypoints`` and check it."""

    name = "keypoints"
    accepts = ("torch",)
    produces = "onnx"
    Config = KeypointsConfig
    description = "keypoint model -> ONNX (dynamic R incl. 0), verified in ORT and OpenVINO"

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        from damo_plugins.keypoints.export import export_keypoint_model

        cfg: KeypointsConfig = self.config  # type: ignore[assignment]
        module = copy.deepcopy(artifact.model)
        if hasattr(module, "postprocess"):
            module.postprocess = cfg.method
        proto = export_keypoint_model(module, opset=cfg.opset, seed=ctx.seed)
        out = onnx_artifact(proto, provenance=list(artifact.provenance), meta=dict(artifact.meta))
        out.meta.update(opset=cfg.opset, keypoint_postprocess=cfg.method)
        out.meta["torch_arch"] = artifact.arch
        return out

    def verify(self, before: ModelArtifact, after: ModelArtifact, ctx: PassContext) -> Verification:
        from damo_plugins.keypoints.export import verify_keypoint_model

        cfg: KeypointsConfig = self.config  # type: ignore[assignment]
        if hasattr(before.model, "proposal_generator"):
            return _verify_full_pass(before.model, after.model, cfg, ctx)
        results = verify_keypoint_model(
            before.model, after.model, cfg.verify_rois, cfg.backends, seed=ctx.seed
        )
        ctx.extra["keypoints"] = results
        worst_agree = min(m["argmax_agreement"] for b in results.values() for m in b.values())
        worst_px = max(
            max(m.get("max_dx_px", 0.0), m.get("max_dy_px", 0.0))
            for b in results.values()
            for m in b.values()
        )
        ok = worst_agree >= cfg.min_agreement and worst_px <= cfg.max_px
        msg = (
            f"argmax agreement {worst_agree:.4f} (need {cfg.min_agreement}), "
            f"max |dx|,|dy| {worst_px:.2e} px over R={cfg.verify_rois} in {', '.join(results)}"
        )
        return Verification(ok, {"argmax_agreement": worst_agree, "max_px": worst_px}, msg)


def _verify_full_pass(
    model: Any, proto: Any, cfg: KeypointsConfig, ctx: PassContext
) -> Verification:
    """The whole Keypoint R-CNN: eager vs each backend on two random images."""
    import torch

    from damo_plugins.keypoints.rcnn import verify_keypoint_rcnn

    g = torch.Generator().manual_seed(ctx.seed)
    images = [torch.rand(1, 3, h, w, generator=g) * 255 for h, w in ((128, 160), (96, 200))]
    results = verify_keypoint_rcnn(model, proto, images, cfg.backends)
    ctx.extra["keypoints"] = results
    every = [m for per_image in results.values() for m in per_image]
    counts_ok = all(m["count_equal"] == 1.0 for m in every)
    agree = min((m.get("argmax_agreement", 1.0) for m in every), default=1.0)
    px = max((max(m.get("max_dx_px", 0.0), m.get("max_dy_px", 0.0)) for m in every), default=0.0)
    box = max((m.get("max_dbox_px", 0.0) for m in every), default=0.0)
    ok = counts_ok and agree >= cfg.min_agreement and px <= cfg.max_px and box <= cfg.max_px
    msg = (
        f"detection counts {'equal' if counts_ok else 'DIFFER'}, max |dbox| {box:.2e} px, "
        f"keypoint agreement {agree:.4f}, max |dx|,|dy| {px:.2e} px in {', '.join(results)}"
    )
    return Verification(ok, {"argmax_agreement": agree, "max_px": px, "max_dbox_px": box}, msg)


@hookimpl
def damo_passes() -> list[type[Pass]]:
    return [KeypointsPass]


@hookimpl
def damo_models() -> dict[str, Any]:
    # lazy: keypoints.head imports torch, which only building the model needs
    return {
        "keypoint-rcnn-head": lazy(_heads, "build_keypoint_rcnn_head"),
        "keypoint-rcnn-r50-fpn": lazy(_rcnn, "build_keypoint_rcnn"),
    }


def _heads() -> ModuleType:
    from damo_plugins.keypoints import head

    return head


def _rcnn() -> ModuleType:
    from damo_plugins.keypoints import rcnn

    return rcnn


@hookimpl
def damo_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("keypoints", help="keypoint R-CNN export (Detectron2 layout)")
    verbs = parser.add_subparsers(dest="keypoints_verb", required=True)
    exp = verbs.add_parser("export", help="export a keypoint model or the post-processing alone")
    exp.add_argument(
        "model",
        nargs="?",
        default=None,
        help="registered name (default keypoint-rcnn-head, or keypoint-rcnn-r50-fpn with --full)",
    )
    exp.add_argument("-o", "--output", required=True, help="ONNX file to write")
    exp.add_argument("--opset", type=int, default=17, help="ONNX opset, 16–18 (default 17)")
    exp.add_argument("--method", choices=["vectorized", "pruned", "loop"], default="vectorized")
    exp.add_argument(
        "--weights",
        help="Detectron2 checkpoint (.pkl model zoo or .pth): roi_heads.keypoint_head.* for "
        "the head, everything with --full; .pkl is read with a numpy-only unpickler, .pth "
        "with weights_only=True",
    )
    exp.add_argument(
        "--postprocess-only",
        action="store_true",
        help="write heatmaps_to_keypoints alone: maps [R,K,H,W], rois [R,4]",
    )
    exp.add_argument(
        "--full",
        action="store_true",
        help="the whole Keypoint R-CNN R50-FPN (image -> boxes, scores, classes, keypoints) "
        "in one graph; --weights then loads the whole checkpoint",
    )
    exp.add_argument(
        "--int8",
        action="store_true",
        help="with --full: NNCF INT8 of the backbone + FPN (heads and post-processing float), "
        "written as OpenVINO IR (-o X.xml); fidelity vs FP32 on held-out --calib images",
    )
    exp.add_argument("--calib", help="with --int8: a folder of images (or a .npy [N,3,H,W] BGR)")
    exp.add_argument("--num-keypoints", type=int, default=17)
    exp.add_argument("--no-verify", action="store_true", help="skip the ORT/OpenVINO checks")
    exp.add_argument("--json", action="store_true", help="print the file and checks as JSON")
    exp.set_defaults(func=cli_export)


def cli_export(args: argparse.Namespace) -> int:
    """``damo-opt keypoints export``: write the ONNX file, check it, print the metrics."""
    from damo_plugins.core.io import atomic_path
    from damo_plugins.keypoints.export import (
        PostprocessModule,
        export_keypoint_model,
        export_postprocess,
        verify_keypoint_model,
    )

    target = Path(args.output)
    int8 = bool(getattr(args, "int8", False))
    _check_int8_args(args, int8)
    images = _int8_images(args.calib) if int8 else []  # a bad folder fails before the export
    if not int8 and target.suffix.lower() != ".onnx":
        raise DamoError(f"output must be an .onnx file, got {target}", "e.g. -o keypoints.onnx")
    if args.num_keypoints < 1:
        raise DamoError("--num-keypoints must be at least 1")
    if args.model is None:
        args.model = "keypoint-rcnn-r50-fpn" if args.full else "keypoint-rcnn-head"
    if args.full and args.postprocess_only:
        raise DamoError("--full and --postprocess-only exclude each other")
    if args.postprocess_only:
        module: Any = PostprocessModule(args.method, args.num_keypoints)
        proto = export_postprocess(
            opset=args.opset, method=args.method, num_keypoints=args.num_keypoints
        )
        rois = [0, 1, 5]
    else:
        from damo_plugins.core.manager import get_manager

        builder = get_manager().get_model_builder(args.model)
        module = builder(num_keypoints=args.num_keypoints, postprocess=args.method)
        if args.weights:
            if not hasattr(module, "load_detectron2"):
                raise DamoError(f"model '{args.model}' cannot load Detectron2 weights")
            unused = module.load_detectron2(args.weights)
            print(f"loaded {args.weights} ({len(unused)} unused entries)")
        rois = [0, 1, 4]
        proto = export_keypoint_model(module, opset=args.opset)
    if int8:
        status, record = _export_int8(proto, images, target)
        if getattr(args, "json", False):
            from damo_plugins.core.verbs import print_json

            print_json(record)
        return status
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        Path(tmp).write_bytes(proto.SerializeToString())
    print(f"wrote {target} (opset {args.opset}, {args.method} post-processing)")
    if not args.postprocess_only or args.method != "vectorized":
        from damo_plugins.keypoints.export import OPENVINO_F32_CONFIG

        # the head's convolutions and box arithmetic precede the f32 graph tail (see docs)
        print(
            "  OpenVINO: compile with "
            f"core.compile_model(model, 'CPU', {OPENVINO_F32_CONFIG!r}) for f32 keypoints; "
            "the default on bf16-capable CPUs rounds boxes and heatmaps to bf16"
        )
    result: dict[str, Any] = {
        "output": str(target),
        "model": None if args.postprocess_only else args.model,
        "opset": args.opset,
        "method": args.method,
        "verification": {},
    }
    status = 0
    if not args.no_verify and hasattr(module, "proposal_generator"):
        status = _verify_full(module, proto, result["verification"])
    elif not args.no_verify:
        for backend, per_r in verify_keypoint_model(module, proto, rois).items():
            result["verification"][backend] = per_r
            for r, m in per_r.items():
                shown = ", ".join(f"{k} {v:.3g}" for k, v in m.items())
                print(f"  {backend:12s} {r:6s} {shown}")
                if m["argmax_agreement"] < 1.0:
                    status = 3
    result["passed"] = None if args.no_verify else status == 0
    if args.json:
        from damo_plugins.core.verbs import print_json

        print_json(result)
    return status


def _check_int8_args(args: argparse.Namespace, int8: bool) -> None:
    """``--int8`` / ``--calib`` / ``-o`` combinations, each mistake as one line."""
    calib = getattr(args, "calib", None)
    if not int8:
        if calib:
            raise DamoError("--calib is only used with --int8")
        return
    if not args.full:
        raise DamoError(
            "--int8 quantizes the whole Keypoint R-CNN", "add --full (the head alone is FP32)"
        )
    if not calib:
        raise DamoError("--int8 needs calibration images", "add --calib DIR (a few dozen images)")
    if Path(args.output).suffix.lower() != ".xml":
        raise DamoError(
            f"the INT8 model is an OpenVINO IR: -o must end in .xml, got {args.output}",
            "e.g. -o keypoint_rcnn_int8.xml",
        )


def _int8_images(calib: str) -> list[Any]:
    """The ``--calib`` images, resized and ordered as Detectron2 feeds its model."""
    from damo_plugins.keypoints.int8 import read_bgr_images, split_holdout

    images = read_bgr_images(calib)
    split_holdout(images)  # enough images to hold some out, checked now
    return images


def _export_int8(proto: Any, images: list[Any], target: Path) -> tuple[int, dict[str, Any]]:
    """Quantize, write the IR, print the fidelity on held-out images; ``(status, record)``
    with status 3 when the fidelity is out of the bounds of :mod:`keypoints.int8`."""
    from damo_plugins.keypoints.int8 import export_int8, fidelity_failures

    info, fid = export_int8(proto, images, target)
    print(
        f"wrote {target} (INT8: {info['quantized_layers']} of {info['backbone_layers']} backbone "
        f"layers, {info['quantized_ops']} quantized ops; {info['kept_float_ops']} ops float; "
        f"calibrated on {info['calibration_images']} images)"
    )
    shown = ", ".join(f"{k} {v:.3g}" for k, v in fid.items())
    print(f"  fidelity vs FP32 on {info['held_out_images']} held-out image(s): {shown}")
    bad = fidelity_failures(fid)
    if bad:
        print(f"  INT8 fidelity out of bounds: {'; '.join(bad)}")
    record = {"output": str(target), "quantization": info, "fidelity": fid, "passed": not bad}
    return (3 if bad else 0), record


def _verify_full(module: Any, proto: Any, record: dict[str, Any] | None = None) -> int:
    """Eager vs ORT / OpenVINO (f32) on two random images of different sizes."""
    import torch

    from damo_plugins.keypoints.rcnn import verify_keypoint_rcnn

    g = torch.Generator().manual_seed(0)
    images = [torch.rand(1, 3, h, w, generator=g) * 255 for h, w in ((128, 160), (96, 200))]
    status = 0
    for backend, per_image in verify_keypoint_rcnn(module, proto, images).items():
        if record is not None:
            record[backend] = {
                f"{h}x{w}": m for (h, w), m in zip(((128, 160), (96, 200)), per_image)
            }
        for (h, w), m in zip(((128, 160), (96, 200)), per_image):
            shown = ", ".join(f"{k} {v:.3g}" for k, v in m.items())
            print(f"  {backend:12s} {h}x{w} {shown}")
            if not m["count_equal"] or m.get("argmax_agreement", 0.0) < 1.0:
                status = 3
    return status
