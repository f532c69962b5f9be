"""``damo-opt demo``: the main job, end to end, on a model the package ships.

The demo is an ordinary recipe run through the pipeline, so it exercises exactly what users
run. With the embedded model (a DAMO-YOLO-T at quarter width, trained by
``damo-opt train`` on the project's synthetic detection set, see ``docs/benchmarks.md``) it
measures accuracy and speed before and after compression:

    evaluate (PyTorch) -> reparam -> export (ONNX Runtime check) -> convert (OpenVINO FP32)
    -> benchmark -> evaluate -> quantize (NNCF INT8, head kept FP) -> benchmark -> evaluate

Without the embedded checkpoint (a source checkout before it was trained) it falls back to
an untrained DAMO-YOLO-T and says so.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from damo_plugins.core.manager import get_manager
from damo_plugins.core.pipeline import RunResult, run

#: the embedded model, inside the package (``damo_plugins/assets``)
EMBEDDED = "damo-yolo-nano-synth.pt"


def embedded_checkpoint() -> Path | None:
    """Path of the shipped demo checkpoint, if this installation has it."""
    path = Path(str(resources.files("damo_plugins") / "assets" / EMBEDDED))
    return path if path.is_file() else None


def demo_recipe(quick: bool = False) -> dict[str, Any]:
    """The demo's recipe: the embedded model, evaluated, fused, exported, INT8, measured."""
    ckpt = embedded_checkpoint()
    images = 24 if quick else 200
    seconds = 1.0 if quick else 5.0
    calib = 16 if quick else 128
    evaluate = {"evaluate": {"data": "synthetic", "images": images}}
    bench = {"benchmark": {"adapter": "openvino", "seconds": seconds}}
    if ckpt is not None:
        recipe: dict[str, Any] = {"model": str(ckpt)}
    else:
        size = 160 if quick else 256
        recipe = {
            "model": "damo-yolo-t",
            "model_args": {"width": 0.25, "num_classes": 6},
            "input_shape": [1, 3, size, size],
        }
    recipe["steps"] = [
        evaluate,
        "reparam",
        {"export": {"opset": 17}},
        {"convert": {"to": "openvino"}},
        bench,
        evaluate,
        {
            "quantize": {
                "adapter": "nncf",
                "target": "openvino",
                "calibration": {"synthetic": calib},
                "subset_size": calib,
            }
        },
        bench,
        evaluate,
    ]
    return recipe


def run_demo(
    output: str | Path = "runs/demo",
    *,
    force: bool = False,
    quick: bool = False,
    log: Callable[[str], None] = print,
) -> RunResult:
    from damo_plugins.core.recipe import load_recipe

    recipe = demo_recipe(quick)
    if embedded_checkpoint() is None:
        log(
            "demo: the embedded trained model is not in this installation; using an untrained "
            "DAMO-YOLO-T (mAP will be ~0)"
        )
    names = ", ".join(s if isinstance(s, str) else next(iter(s)) for s in recipe["steps"])
    log(f"demo: {Path(recipe['model']).name}, steps: {names}")
    loaded = load_recipe(recipe, get_manager(), source="<demo>")
    return run(loaded, output=output, force=force, log=log)
