"""The Python API: the DAMO parts for workflows that are not ``damo-opt``'s.

Someone with an NNCF/OpenVINO script of their own wants pieces, not a pipeline: fuse the
re-parameterizable branches of *their* ``nn.Module``, get the detector's decode tail as an
``nncf.IgnoredScope`` for *their* ``nncf.quantize`` call, load an official checkpoint without
knowing its architecture, or run one of the project's passes on a model held in memory.

Everything here is a thin wrapper: the passes run through
:func:`damo_plugins.core.runner.run_step` (the same runner as the CLI and recipes, so the
same checks and the same failure messages), on a temporary working folder that is removed
afterwards. Transforms return a :class:`~damo_plugins.core.artifact.ModelArtifact` (``.model``
is the ``nn.Module`` / ``onnx.ModelProto`` / ``openvino.Model``); measurements return their
metrics. A step whose verification fails raises
:class:`~damo_plugins.core.errors.VerificationError` (pass ``verify=False`` to skip checks).
See ``docs/python-api.md``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from damo_plugins.core.artifact import ModelArtifact, load_model, onnx_artifact
from damo_plugins.core.errors import DamoError
from damo_plugins.core.manager import PluginManager, get_manager
from damo_plugins.core.passes import PassContext
from damo_plugins.core.runner import StepResult, run_step

__all__ = [
    "benchmark",
    "decode_ignored_scope",
    "distill",
    "evaluate",
    "load",
    "optimize",
    "prune",
    "quantize",
    "reparameterize",
    "run_pass",
]


def load(
    model: Any,
    *,
    input_shape: Sequence[int] | None = None,
    model_args: dict[str, Any] | None = None,
    arch: str | None = None,
    manager: PluginManager | None = None,
) -> ModelArtifact:
    """A model as an artifact: a builder name, a file, an ``nn.Module``, ONNX or OpenVINO.

    Files may be official weights-only checkpoints (the upstream trainer's ``.pth``): the
    architecture is recognised from the keys and shapes; ``arch`` overrides it.
    ``input_shape`` is needed for a bare ``nn.Module`` that does not declare one.
    """
    if isinstance(model, ModelArtifact):
        return model
    kind = type(model).__module__.split(".", 1)[0]
    if kind == "onnx" and type(model).__name__ == "ModelProto":
        return onnx_artifact(model)
    if kind == "openvino" and hasattr(model, "get_ordered_ops"):
        from damo_plugins.lib.openvino_graph import ir_param_count, port_specs

        return ModelArtifact(
            "openvino",
            model,
            inputs=port_specs(model.inputs),
            outputs=port_specs(model.outputs),
            meta={"params": ir_param_count(model)},
        )
    return load_model(
        model,
        manager=manager,
        input_shape=input_shape,
        model_args=model_args,
        arch=arch,
    )


def reparameterize(
    module: Any, *, fold_bn: bool = True, mode: str = "auto", space_to_depth: bool = True
) -> Any:
    """A fused copy of any ``nn.Module``: RepConv/RepVGG branches merged, Conv+BN folded.

    Works on modules that are not this project's: multi-branch sums of convolutions (3x3 +
    1x1 + identity-BN) are found by tracing (``mode="graph"``/``"auto"``); modules with a
    ``switch_to_deploy``-style method are deployed (``"module"``/``"auto"``), and with
    ``space_to_depth`` Focus stems (ours, or four ``x[..., dy::2, dx::2]`` phases
    concatenated before a conv in your code) become one stride-2 convolution. The input
    module is left as it was; the result is in eval mode. Outputs are equal up to float
    rounding.
    """
    from damo_plugins.lib.reparam import reparameterize as _fuse

    fused, _report = _fuse(module, mode=mode, fold=fold_bn, space_to_depth=space_to_depth)
    return fused


def decode_ignored_scope(model: Any) -> Any:
    """The detector's decode tail as an ``nncf.IgnoredScope``, for your own ``nncf.quantize``.

    ``model`` is an ``openvino.Model`` or an ONNX ``ModelProto``. The tail (sigmoid scores,
    softmax over distance bins, integral, stride, distance -> box) is found structurally —
    from each output back to the last convolutions — so any export works, whatever its node
    names. ONNX nodes without names are named in place first (NNCF addresses nodes by name).
    An empty scope means the model has no decode tail (e.g. a classifier).
    """
    import nncf

    kind = type(model).__module__.split(".", 1)[0]
    if kind == "onnx":
        from damo_plugins.lib.decode import name_onnx_nodes, onnx_decode_nodes

        name_onnx_nodes(model)
        names = onnx_decode_nodes(model)
    elif kind == "openvino" and hasattr(model, "get_ordered_ops"):
        from damo_plugins.lib.openvino_graph import decode_nodes

        names = decode_nodes(model)
    else:
        raise DamoError(
            f"decode_ignored_scope takes an openvino.Model or an onnx.ModelProto, "
            f"not {type(model).__name__}",
            "export or convert the model first (damo_plugins.api.load(...).model)",
        )
    return nncf.IgnoredScope(names=list(names))


def run_pass(
    name: str,
    model: Any,
    *,
    verify: bool = True,
    seed: int = 0,
    input_shape: Sequence[int] | None = None,
    log: Callable[[str], None] | None = None,
    manager: PluginManager | None = None,
    **options: Any,
) -> StepResult:
    """Run the registered pass ``name`` with ``options`` (a recipe step's keys) on ``model``.

    The general form of the wrappers below; the result carries the new artifact, the
    verification and the metrics. Raises :class:`~damo_plugins.core.errors.VerificationError`
    if the step's own check fails.
    """
    mgr = manager or get_manager()
    pass_cls = mgr.get_pass(name)
    step = pass_cls(pass_cls.validate_config(options, mgr))
    art = load(model, input_shape=input_shape, manager=mgr)
    with tempfile.TemporaryDirectory(prefix=f"damo-{name}-") as tmp:
        ctx = PassContext(
            manager=mgr, workdir=Path(tmp), seed=seed, verify=verify, log=log or _quiet
        )
        result = run_step(step, art, ctx)
    # passes keep their results in memory; the scratch folder held only temporary files
    return result.raise_if_failed("pass verify=False to skip checks")


def prune(model: Any, *, ratio: float = 0.3, **options: Any) -> ModelArtifact:
    """Structured channel pruning (the ``prune`` pass); ``ratio`` of prunable channels go."""
    return run_pass("prune", model, ratio=ratio, **options).artifact


def distill(model: Any, *, teacher: str, data: str, **options: Any) -> ModelArtifact:
    """Train ``model`` with a teacher's features (the ``distill`` pass, CWD loss by default)."""
    return run_pass("distill", model, teacher=teacher, data=data, **options).artifact


def quantize(model: Any, **options: Any) -> ModelArtifact:
    """INT8 post-training quantization (the ``quantize`` pass: NNCF by default, decode tail in
    float, re-parameterizable branches fused first); returns the quantized artifact."""
    return run_pass("quantize", model, **options).artifact


def evaluate(model: Any, **options: Any) -> dict[str, Any]:
    """mAP of a detector (the ``evaluate`` pass): ``{"mAP", "mAP50", "images"}``."""
    return dict(run_pass("evaluate", model, **options).metrics["evaluation"])


def benchmark(model: Any, **options: Any) -> dict[str, Any]:
    """Latency statistics (the ``benchmark`` pass; OpenVINO on the CPU by default)."""
    return dict(run_pass("benchmark", model, **options).metrics["benchmark"])


def optimize(*args: Any, **kwargs: Any) -> Any:
    """Search chains of passes for the fastest model within an accuracy budget
    (:func:`damo_plugins.optimize.optimize`)."""
    from damo_plugins.optimize import optimize as _optimize

    return _optimize(*args, **kwargs)


def _quiet(message: str) -> None:
    """Default log of the API: silent (a library does not print unless asked)."""
