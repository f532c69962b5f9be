"""Measuring a model the way ``optimize`` and ``compare`` report it: mAP, size, latency.

Everything that changes a model goes through the step runner (:func:`apply`), so a figure
here is the figure of exactly what a recipe step would produce. mAP is the ``evaluate``
pass's (OpenVINO at f32, ONNX Runtime, PyTorch eager); a named OpenVINO precision other than
f32 (bf16/f16) is measured on the model compiled at that precision, because the ``evaluate``
pass always runs at f32 — the figure must be that of the candidate as it would be deployed.
Latency is batch 1 on the target device, interleaved with the baseline in rounds
(:func:`damo_plugins.lib.timing.interleaved_timing`): per-round ratios cancel most of the drift
of a shared machine.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from damo_plugins.core.artifact import ModelArtifact
from damo_plugins.core.errors import DamoError
from damo_plugins.core.manager import PluginManager
from damo_plugins.core.passes import PassContext
from damo_plugins.core.runner import StepResult, run_step

#: runtimes a model can be measured in, and the artifact format each runs
RUNTIMES = {"openvino": "openvino", "onnxruntime": "onnx", "torch": "torch"}


def apply(
    mgr: PluginManager,
    name: str,
    options: Mapping[str, Any],
    artifact: ModelArtifact,
    workdir: Path,
    log: Callable[[str], None],
    seed: int = 0,
) -> StepResult:
    """One pass through the step runner, verified; a failed verification is an error."""
    cls = mgr.get_pass(name)
    config = cls.validate_config(dict(options), mgr)
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = PassContext(manager=mgr, workdir=workdir, seed=seed, verify=True, log=log)
    return run_step(cls(config), artifact, ctx).raise_if_failed("the candidate is skipped")


def to_runtime(
    artifact: ModelArtifact,
    runtime: str,
    mgr: PluginManager,
    workdir: Path,
    log: Callable[[str], None] = lambda _: None,
) -> ModelArtifact:
    """``artifact`` in the format ``runtime`` runs: export (ONNX) and convert (IR) passes."""
    if runtime not in RUNTIMES:
        raise DamoError(f"unknown runtime '{runtime}'", f"one of {', '.join(RUNTIMES)}")
    want = RUNTIMES[runtime]
    art = artifact
    if art.format == want:
        return art
    if want == "torch":
        raise DamoError(
            f"a {art.format} model cannot run in PyTorch", "use --runtime openvino or onnxruntime"
        )
    if art.format == "openvino" and want == "onnx":
        raise DamoError(
            "an OpenVINO IR cannot run in ONNX Runtime", "use --runtime openvino for an .xml model"
        )
    if art.format == "torch":
        art = apply(mgr, "export", {"opset": 17}, art, workdir / "export", log).artifact
    if want == "openvino" and art.format == "onnx":
        art = apply(mgr, "convert", {"to": "openvino"}, art, workdir / "convert", log).artifact
    return art


class _Compiled:
    """A model compiled at a chosen OpenVINO precision, with ``ModelArtifact.run``'s shape."""

    format = "openvino"  # what the evaluation's progress line names

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled

    def run(self, feeds: Any, manager: Any = None) -> list[np.ndarray]:
        res = self.compiled(list(feeds))
        return [np.asarray(res[o]) for o in self.compiled.outputs]


def evaluate(
    artifact: ModelArtifact,
    data_dir: Path,
    split: str,
    mgr: PluginManager,
    *,
    precision: str = "f32",
    device: str = "CPU",
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, float]:
    """COCO mAP / mAP@.5 of ``artifact`` on ``data_dir/split`` (+ ``split.json``).

    f32 (and every non-OpenVINO format) through the ``evaluate`` pass; another OpenVINO
    precision on the model compiled at it, with the same data and scoring code.
    """
    if artifact.format != "openvino" or precision == "f32":
        with tempfile.TemporaryDirectory(prefix="damo-eval-") as tmp:
            res = apply(
                mgr, "evaluate", {"data": str(data_dir), "split": split}, artifact, Path(tmp), log
            )
        ev = res.metrics["evaluation"]
        return {"mAP": float(ev["mAP"]), "mAP50": float(ev["mAP50"]), "images": ev["images"]}
    from damo_plugins.data.evaluate import dataset_for, evaluate_artifact

    cfg = mgr.get_pass("evaluate").Config(data=str(data_dir), split=split)
    dataset = dataset_for(cfg, int(artifact.input_shape[-1]))
    compiled = mgr.get_adapter("openvino").compile(artifact, device, precision=precision)
    m = evaluate_artifact(_Compiled(compiled), dataset, cfg, mgr)  # type: ignore[arg-type]
    return {"mAP": float(m["mAP"]), "mAP50": float(m["mAP50"]), "images": len(dataset)}


def precision_supported(device: str, precision: str) -> bool:
    """Whether OpenVINO on ``device`` runs float ops at ``precision`` natively.

    Asked of OpenVINO itself (``OPTIMIZATION_CAPABILITIES``): a bf16 candidate on a CPU
    without bf16 units would be emulated, slower and meaningless.
    """
    if precision in ("f32", "default"):
        return True
    import openvino as ov

    try:
        caps = {str(c).upper() for c in ov.Core().get_property(device, "OPTIMIZATION_CAPABILITIES")}
    except Exception:  # an unavailable device: check_device reports it
        return False
    return {"bf16": "BF16", "f16": "FP16"}.get(precision, precision.upper()) in caps


def check_device(mgr: PluginManager, device: str) -> None:
    """One clear line when the target device is not on this machine."""
    mgr.get_adapter("openvino").check_device(device)


def runner(
    artifact: ModelArtifact,
    runtime: str,
    precision: str,
    device: str,
    mgr: PluginManager,
    feed: np.ndarray,
) -> Callable[[], Any]:
    """A zero-argument call running one batch-1 inference, compiled once, for timing."""
    if runtime == "openvino":
        prec = None if precision == "default" else precision
        compiled = mgr.get_adapter("openvino").compile(
            artifact, device, hint="latency", precision=prec
        )
        request = compiled.create_infer_request()
        request.get_input_tensor(0).data[...] = feed
        return request.infer
    if runtime == "onnxruntime":
        from damo_plugins.core.onnx_utils import ort_session

        sess = ort_session(artifact.model)
        feeds = {sess.get_inputs()[0].name: feed}
        return lambda: sess.run(None, feeds)
    if runtime == "torch":
        import torch

        module = artifact.model.eval()
        x = torch.from_numpy(feed)

        def eager() -> Any:
            with torch.no_grad():
                return module(x)

        return eager
    raise DamoError(f"unknown runtime '{runtime}'", f"one of {', '.join(RUNTIMES)}")


def latency(
    fns: Mapping[str, Callable[[], Any]], *, rounds: int = 5, slot_seconds: float = 0.25
) -> dict[str, dict[str, Any]]:
    """Per key: median ms and per-round medians, all keys measured in the same rounds."""
    from damo_plugins.lib.timing import interleaved_timing

    times = interleaved_timing(
        dict(fns), rounds, slot_seconds=slot_seconds, warmup=2, slot_warmup=1
    )
    return {k: {"median_ms": times.median(k), "per_round": times.per_round(k)} for k in fns}


def size_on_disk(path: Path | None) -> int | None:
    """Bytes of a model's files: an IR's ``.xml`` + ``.bin``, else the one file."""
    if path is None:
        return None
    p = Path(path)
    files = [p, p.with_suffix(".bin")] if p.suffix == ".xml" else [p]
    return sum(f.stat().st_size for f in files if f.is_file()) or None


def model_files(path: Path) -> list[Path]:
    """The files making up a saved model (an IR is two)."""
    return [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]
