"""``evaluate``: COCO mAP of a detector in any format, as a recipe step.

Compression is only honest when accuracy is measured after every step. This pass runs the
artifact as it is — PyTorch eagerly, ONNX in ONNX Runtime, IR in OpenVINO (f32 inference
precision, so the number is the model's and not the CPU's default bf16) — on a COCO-format
validation set, applies DAMO's multi-class NMS and scores with pycocotools. The model
passes through unchanged; ``mAP`` and ``mAP50`` go into the report.

Data: a folder in our layout (``DATA/val/`` + ``DATA/val.json``), or ``generated`` for the
project's deterministic synthetic set (made once per process in a temporary folder).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from damo_plugins.core.artifact import ModelArtifact
from damo_plugins.core.errors import DamoError
from damo_plugins.core.hookspecs import hookimpl
from damo_plugins.core.passes import Pass, PassConfig, PassContext
from damo_plugins.core.verify import Verification


class EvaluateConfig(PassConfig):
    data: str | None = Field(
        None,
        description="data folder (DATA/val + DATA/val.json) or 'synthetic' (the generated set "
        "the embedded model was trained on; 'generated' is the same). Required, except for "
        "the embedded model itself",
        json_schema_extra={"path": "data"},  # relative to the recipe; keywords stay
    )
    split: str = Field("val", description="which split of the folder")
    images: int = Field(100, ge=1, description="images to generate for data: generated")
    limit: int | None = Field(None, ge=1, description="evaluate only the first N images")
    seed: int = Field(0, description="seed of the generated data")
    conf: float = Field(0.05, ge=0, le=1)
    iou: float = Field(0.7, gt=0, le=1)
    min_map: float | None = Field(None, ge=0, le=1, description="fail below this mAP@[.5:.95]")
    workers: int = Field(
        1,
        ge=1,
        description="1: this process (default); N > 1: N shards run by local worker processes, "
        "or by Ray when ray: is set or DAMO_RAY_ADDRESS is; one COCO evaluation of all "
        "detections, equal to the single-process mAP",
    )
    ray: str | None = Field(
        None,
        description="run the shards as Ray tasks: 'local' (a private Ray instance), 'auto' or "
        "a cluster address; data must be at the same path on every node",
    )


class EvaluatePass(Pass):
    """Measure COCO mAP; the model passes through unchanged."""

    name = "evaluate"
    accepts = ("torch", "onnx", "openvino")
    Config = EvaluateConfig
    measures_only = True
    description = "COCO mAP@[.5:.95] / mAP@.5 of a detector on a validation set"

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        # the data/mAP code pulls in torch and pycocotools: only when a step really runs
        from damo_plugins.data.evaluate import dataset_for, evaluate_artifact

        cfg: EvaluateConfig = self.config  # type: ignore[assignment]
        shape = artifact.input_shape
        if len(shape) != 4 or shape[2] != shape[3]:
            raise DamoError(f"evaluate needs a square image input [N, 3, S, S], not {shape}")
        if cfg.data is None:
            if not _is_embedded(artifact):
                raise DamoError(
                    "evaluate needs data: a COCO data folder (data: DIR), or data: synthetic "
                    "for the generated set",
                    "an mAP on data the model was not made for would mean nothing",
                )
            ctx.log("  evaluating the embedded model on its own generated data (synthetic)")
            cfg = cfg.model_copy(update={"data": "synthetic"})
        dataset = dataset_for(cfg, shape[2])
        if cfg.workers == 1 and cfg.ray is None:
            metrics = evaluate_artifact(artifact, dataset, cfg, ctx.manager)
        else:
            from damo_plugins.data.sharded import evaluate_sharded
            from damo_plugins.lib.executors import open_executor

            with open_executor(cfg.ray, cfg.workers) as executor:
                ctx.log(f"  evaluating in shards on {executor.describe()}")
                metrics = evaluate_sharded(
                    artifact,
                    dataset,
                    cfg,
                    executor,
                    shards=cfg.workers if cfg.workers > 1 else None,
                    manager=ctx.manager,
                    generated=(cfg.images, cfg.seed)
                    if cfg.data in ("generated", "synthetic")
                    else None,
                )
        ctx.extra["evaluation"] = {
            "mAP": metrics["mAP"],
            "mAP50": metrics["mAP50"],
            "images": cfg.limit or len(dataset),
        }
        ctx.log(f"  mAP@[.5:.95] {metrics['mAP']:.4f}, mAP@.5 {metrics['mAP50']:.4f}")
        out = artifact.derive()
        out.path = artifact.path
        return out

    def verify(self, before: ModelArtifact, after: ModelArtifact, ctx: PassContext) -> Verification:
        ev = ctx.extra.get("evaluation", {})
        floor = self.config.min_map  # type: ignore[attr-defined]
        ok = floor is None or ev.get("mAP", 0.0) >= floor
        msg = f"mAP {ev.get('mAP', 0):.4f}" + (f" (floor {floor})" if floor is not None else "")
        return Verification(ok, dict(ev), msg)


@hookimpl
def damo_passes() -> list[type[Pass]]:
    return [EvaluatePass]


# ----------------------------------------------------------------------------------- CLI
#: runtime -> the artifact format it runs
_RUNTIME_FORMAT = {"openvino": "openvino", "onnxruntime": "onnx", "torch": "torch"}


def cmd_evaluate(args: Any) -> int:
    """``damo-opt evaluate MODEL --data DATA``: the ``evaluate`` step on the whole val split.

    ``--data`` is any layout :mod:`damo_plugins.data.sources` resolves; the model is brought
    to the runtime's format by the ``export``/``convert`` passes (through the step runner,
    as in a recipe) and measured by this module's pass.
    """
    import tempfile
    from pathlib import Path

    from damo_plugins.core.manager import get_manager
    from damo_plugins.core.runner import run_step
    from damo_plugins.core.verbs import log, model_from_args, print_json
    from damo_plugins.data.sources import evaluation_folder, model_classes, resolve

    if args.imgsz:
        args.input_shape = [1, 3, args.imgsz, args.imgsz]
    source = resolve(args.data)
    mgr = get_manager()
    art = model_from_args(args)
    source.check_classes(model_classes(art))
    want = _RUNTIME_FORMAT[args.runtime]
    with tempfile.TemporaryDirectory(prefix="damo-evaluate-") as tmp:
        work = Path(tmp)

        def step(name: str, options: dict[str, Any], a: ModelArtifact) -> ModelArtifact:
            cls = mgr.get_pass(name)
            ctx = PassContext(manager=mgr, workdir=work / name, log=log)
            (work / name).mkdir()
            return (
                run_step(cls(cls.validate_config(options, mgr)), a, ctx).raise_if_failed().artifact
            )

        if art.format != want:
            if want == "torch" or (art.format == "openvino" and want == "onnx"):
                raise DamoError(
                    f"a {art.format} model cannot run in {args.runtime}",
                    "choose --runtime openvino (any format) or the model's own runtime",
                )
            if art.format == "torch":
                art = step("export", {"opset": 17}, art)
            if want == "openvino":
                art = step("convert", {"to": "openvino"}, art)
        data_dir = evaluation_folder(source, work / "data")
        ctx = PassContext(manager=mgr, workdir=work, log=log if not args.json else lambda _: None)
        res = run_step(EvaluatePass({"data": str(data_dir), "split": "val"}), art, ctx)
    ev = dict(res.metrics["evaluation"])
    ev.update(model=args.model, data=source.describe(), runtime=args.runtime)
    if args.json:
        print_json(ev)
    else:
        print(
            f"mAP@[.5:.95] {ev['mAP']:.4f}  mAP@.5 {ev['mAP50']:.4f}  "
            f"({ev['images']} images, {args.runtime})"
        )
    return 0


@hookimpl
def damo_cli(subparsers: Any) -> None:
    from damo_plugins.core.verbs import add_model_args

    p = subparsers.add_parser("evaluate", help="COCO mAP of a model (any format) on --data")
    add_model_args(p)
    p.add_argument(
        "--data", required=True, help="COCO folder, DATA dir, .json, dataset .yaml, or synthetic"
    )
    p.add_argument(
        "--runtime",
        choices=tuple(_RUNTIME_FORMAT),
        default="openvino",
        help="default openvino (f32)",
    )
    p.add_argument("--imgsz", type=int, help="square input size N (input 1,3,N,N)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)


def _is_embedded(artifact: ModelArtifact) -> bool:
    """Whether the model came from the checkpoint this package ships (trained on synthetic)."""
    from importlib import resources
    from pathlib import Path

    source = artifact.meta.get("source")
    if not source:
        return False
    assets = resources.files("damo_plugins") / "assets"
    shipped = ("damo-yolo-nano-synth.pt", "damo-yolo-t50-synth.pt")  # tests' and demo's models
    try:
        return Path(str(source)).resolve() in {Path(str(assets / n)).resolve() for n in shipped}
    except OSError:
        return False
