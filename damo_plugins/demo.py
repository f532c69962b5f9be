"""``damo-opt demo``: the main job, end to end, on a model the package builds itself.

The demo is an ordinary recipe run through the pipeline, so it exercises exactly what users
run. It uses only what is installed: steps whose plugins are missing are left out and said so.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from damo_plugins.manager import get_manager
from damo_plugins.pipeline import RunResult, run


def demo_recipe(quick: bool = False) -> dict[str, Any]:
    """The demo's recipe, adapted to the plugins that are installed."""
    mgr = get_manager()
    passes = set(mgr.names("pass"))
    models = set(mgr.names("model"))
    if "damo-yolo-t" in models:
        size = 160 if quick else 320
        recipe: dict[str, Any] = {"model": "damo-yolo-t", "input_shape": [1, 3, size, size]}
    else:
        recipe = {"model": "tiny-cnn", "input_shape": [1, 3, 64, 64]}
    steps: list[Any] = []
    if "reparam" in passes:
        steps.append("reparam")
    steps.append({"export": {"opset": 17}})
    if "openvino" in mgr.names("adapter"):
        steps.append({"convert": {"to": "openvino"}})
    recipe["steps"] = steps
    return recipe


def run_demo(
    output: str | Path = "runs/demo",
    *,
    force: bool = False,
    quick: bool = False,
    log: Callable[[str], None] = print,
) -> RunResult:
    recipe = demo_recipe(quick)
    log(
        f"demo: {recipe['model']} at {recipe['input_shape'][2]}x{recipe['input_shape'][3]}, steps: "
        + ", ".join(s if isinstance(s, str) else next(iter(s)) for s in recipe["steps"])
    )
    from damo_plugins.recipe import load_recipe

    loaded = load_recipe(recipe, get_manager(), source="<demo>")
    return run(loaded, output=output, force=force, log=log)
