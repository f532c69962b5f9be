"""Intel Neural Compressor 3.x adapter: PyTorch PT2E static quantization, autotune.

The flow is INC's own: ``neural_compressor.torch.export.export`` (an ``nn.Module`` passed
straight to ``prepare`` fails) -> ``prepare(model, StaticQuantConfig(...))`` -> calibration
-> ``convert``; with ``max_drop``, ``autotune`` over a ``TuningConfig`` (a list of configs)
with an evaluation function and that accuracy goal. The evaluation function is COCO
mAP@[.5:.95] when the validation data is labelled
(:class:`~damo_plugins.data.validation.LabelledDetections`), else agreement with the FP32
model, or the caller's ``validation_fn``. ``max_drop`` is an absolute drop of that metric;
INC's ``tolerable_loss`` is relative to the FP32 baseline, so it gets ``max_drop / baseline``
(which is also why a baseline of 0 is refused up front: INC would divide by it).

The quantized ``GraphModule`` (quantize/dequantize pairs around ATen ops) is slow in eager
PyTorch, so it is handed on: re-exported with ``torch.export`` and converted by OpenVINO
(target ``openvino``, the default; OpenVINO turns the pairs into ``FakeQuantize`` and runs
INT8 kernels) or exported to ONNX QDQ (target ``onnx``).

Keeping the detector decode in floating point: INC's op-level configuration works on module
names and op types, but DAMO-YOLO's decode is a run of functional ops inside the head
module, next to the head's convolutions. So we act one level lower, on the prepared graph:
before calibration, observers whose input or every consumer lies in the decode tail (found
structurally, like everywhere else) are removed — the decode then stays float through
``convert``. The hook runs inside the calibration function, so it applies in ``autotune``'s
trials too. (Without it, INC also fails outright on the integral: ``F.linear`` with the
1-D bin vector trips the per-channel weight observer.)

INC 3.x no longer quantizes ONNX models (that moved to ``onnx-neural-compressor``, which
needs numpy < 2 and cannot be installed beside this stack): an ONNX *input* is a clear error
pointing to NNCF or ONNX Runtime. An ONNX *output* (``target="onnx"``) is offered: the
PyTorch model is quantized by INC as usual and the INT8 GraphModule is exported with
``torch.onnx.export(dynamo=True)`` as a QDQ model that ONNX Runtime and OpenVINO run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import Field

from damo_plugins.core.adapter import (
    AGREEMENT,
    MAP,
    Adapter,
    AdapterOptions,
    LabelledData,
    is_labelled,
)
from damo_plugins.core.artifact import ModelArtifact
from damo_plugins.core.errors import DamoError, UnsupportedError, first_line
from damo_plugins.lib.decode import CONST, INPUT, OP, SHAPE, SIGNATURE, STOP, walk_decode
from damo_plugins.lib.fidelity import as_feeds, fidelity

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np


@contextlib.contextmanager
def _quiet() -> Any:
    """INC logs each step at INFO/WARNING (dozens of lines per model); keep the CLI readable.

    INC's logger is a singleton that sets its own level when first created, so it is created
    here first and then silenced.
    """
    try:
        from neural_compressor.common.utils.logger import Logger

        inc: logging.Logger | None = Logger().get_logger()
    except Exception:
        inc = None
    loggers = [
        lg for lg in (inc, logging.getLogger("torchao"), logging.getLogger("torch.export")) if lg
    ]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, old):
            lg.setLevel(lvl)


#: autotune's default number of trials
MAX_TRIALS = 10


class INCQuantizeOptions(AdapterOptions):
    """INC's accuracy-aware tuning settings (recipe keys of ``quantize: {adapter: inc}``)."""

    configs: list[dict[str, Any]] | None = Field(
        None,
        description="autotune search space with max_drop: StaticQuantConfig settings tried "
        "in order, e.g. [{}, {act_algo: kl}] (default: plain, KL activations, symmetric "
        "activations, per-tensor weights)",
    )
    max_trials: int | None = Field(
        None, ge=1, description=f"autotune: most configurations tried (default {MAX_TRIALS})"
    )


class INCAdapter(Adapter):
    name = "inc"
    backend = "neural_compressor"
    backend_distribution = "neural-compressor"
    capabilities = ("quantize", "autotune")
    options = {"quantize": INCQuantizeOptions}

    def require_backend(self) -> Any:
        mod = super().require_backend()
        try:
            import neural_compressor.torch.quantization  # noqa: F401
        except ImportError as exc:
            raise UnsupportedError(
                f"Intel Neural Compressor's PyTorch API cannot be imported ({exc})",
                "pip install 'neural-compressor[pt]' (the plain package lacks its PyTorch dependencies)",
            ) from exc
        return mod

    def quantize(
        self,
        artifact: ModelArtifact,
        calibration: Iterable[Any],
        *,
        target: str | None = None,
        mode: str = "int8",
        subset_size: int = 300,
        keep_head_fp: bool = True,
        ignored_scope: Mapping[str, Any] | None = None,
        max_drop: float | None = None,
        validation: Iterable[Any] | None = None,
        validation_fn: Callable[[Any], float] | None = None,
        seed: int = 0,
        configs: list[dict[str, Any]] | None = None,
        max_trials: int | None = None,
    ) -> ModelArtifact:
        """See :meth:`Adapter.quantize`; the INC options are :class:`INCQuantizeOptions`.

        ``configs`` and ``max_trials`` shape ``autotune``, so they need ``max_drop``: given
        without it they are an error rather than ignored. ``seed`` is not used (INC's
        calibration and tuning are deterministic given the data).
        """
        import numpy as np

        if max_drop is None and (configs is not None or max_trials is not None):
            raise DamoError(
                "INC's configs and max_trials tune accuracy-controlled quantization; "
                "they need max_drop",
                "give max_drop (and val), or drop configs/max_trials",
            )
        if artifact.format == "onnx":
            raise UnsupportedError(
                "Intel Neural Compressor 3.x no longer quantizes ONNX models (that moved to "
                "onnx-neural-compressor, which needs numpy<2 and does not install beside this stack)",
                "use --adapter nncf or --adapter onnxruntime for ONNX models",
            )
        if artifact.format != "torch":
            raise UnsupportedError(
                f"Intel Neural Compressor quantizes PyTorch models, not {artifact.format}",
                "use --adapter nncf for OpenVINO IR",
            )
        if mode != "int8":
            raise UnsupportedError(
                "INC adapter: only static INT8 (mode int8) is offered",
                "use --adapter nncf --mode weights for weight-only compression",
            )
        target = target or "openvino"
        if target not in ("openvino", "onnx"):
            raise UnsupportedError(
                f"INC adapter: unknown target '{target}'", "use openvino or onnx"
            )
        with _quiet():
            self.require_backend()
        import copy

        import torch
        from neural_compressor.torch.export import export
        from neural_compressor.torch.quantization import StaticQuantConfig, convert, prepare

        items = list(calibration)[: max(1, subset_size)]
        if not items:
            raise DamoError("the calibration set is empty", "give a folder or file with samples")
        example = tuple(torch.from_numpy(f) for f in as_feeds(items[0]))
        module = copy.deepcopy(artifact.model).eval()
        kept: list[str] = []

        def calibrate(prepared: Any) -> None:
            if keep_head_fp:
                kept[:] = strip_decode_observers(prepared)
            with torch.no_grad():
                for item in items:
                    prepared(*[torch.from_numpy(f) for f in as_feeds(item)])

        base_cfg = self._config(StaticQuantConfig, ignored_scope)
        metric = baseline = None
        metric_name = "user"
        if max_drop is not None:
            # Checked on the eager FP32 model before the (slow) export: a bad metric fails fast.
            if validation_fn is not None:
                metric = validation_fn
            elif is_labelled(validation):
                metric, metric_name = _map_metric(validation), MAP
            else:
                metric, metric_name = _agreement_metric(module, validation), AGREEMENT
            baseline = float(metric(module))
            if not np.isfinite(baseline) or baseline <= 0:
                # INC divides by the FP32 baseline (relative loss); zero would crash deep inside.
                raise DamoError(
                    f"the validation metric ({metric_name}) is {baseline} on the FP32 model; "
                    "accuracy-aware tuning needs a positive baseline",
                    "check that the validation data matches the model (classes, image content)",
                )
        info: dict[str, Any] = {
            "adapter": self.name,
            "backend_version": self.backend_version(),
            "calibration_samples": len(items),
            "accuracy_control": max_drop is not None,
        }
        with _quiet(), torch.no_grad():
            try:
                exported = export(module, example)
            except Exception as exc:
                first = first_line(exc)
                raise DamoError(
                    f"INC could not export the model (torch.export): {first[:300]}",
                    "use --adapter nncf, which converts through OpenVINO",
                ) from exc
            if max_drop is None:
                prepared = prepare(exported, base_cfg)
                calibrate(prepared)
                quantized = convert(prepared)
            else:
                quantized, tuning = self._autotune(
                    exported,
                    StaticQuantConfig,
                    calibrate,
                    metric,
                    baseline,
                    max_drop,
                    configs,
                    max_trials if max_trials is not None else MAX_TRIALS,
                    ignored_scope,
                )
                info["autotune"] = tuning
                info.update(
                    accuracy_metric=metric_name,
                    metric_fp32=round(tuning["baseline"], 4),
                    metric_int8=round(tuning["metric"], 4),
                    metric_drop=round(tuning["baseline"] - tuning["metric"], 4),
                    max_drop=max_drop,
                )
        info["kept_fp"] = list(kept)
        return self._hand_off(artifact, quantized, example, target, info)

    @staticmethod
    def _config(cls: Any, ignored_scope: Mapping[str, Any] | None, **kwargs: Any) -> Any:
        cfg = cls(**kwargs)
        for name in (ignored_scope or {}).get("names") or []:
            cfg.set_local(name, cls(w_dtype="fp32", act_dtype="fp32"))
        for op_type in (ignored_scope or {}).get("types") or []:
            cfg.set_local(op_type, cls(w_dtype="fp32", act_dtype="fp32"))
        return cfg

    def _autotune(
        self,
        exported: Any,
        cls: Any,
        calibrate: Callable[[Any], None],
        metric: Callable[[Any], float],
        baseline: float,
        max_drop: float,
        configs: list[dict[str, Any]] | None,
        max_trials: int,
        ignored_scope: Mapping[str, Any] | None,
    ) -> tuple[Any, dict[str, Any]]:
        """INC's ``autotune`` over a list of configs; ``calibrate`` keeps the decode float."""
        from neural_compressor.torch.quantization import TuningConfig, autotune

        space = configs or [
            {},
            {"act_algo": "kl"},
            {"act_sym": True},
            {"w_granularity": "per_tensor"},
        ]
        config_set = [self._config(cls, ignored_scope, **c) for c in space]
        # max_drop is absolute; INC's tolerable loss is relative to the baseline.
        tolerable = max_drop / baseline
        tune = TuningConfig(config_set=config_set, tolerable_loss=tolerable, max_trials=max_trials)
        try:
            best = autotune(exported, tune, eval_fn=metric, run_fn=calibrate)
        except TypeError as exc:
            raise DamoError(f"INC autotune rejected a configuration: {exc}") from exc
        if best is None:
            raise DamoError(
                f"INC autotune found no configuration within max_drop {max_drop} of the FP32 metric",
                "raise --max-drop, or use more calibration data",
            )
        score = float(metric(best))
        if baseline - score > max_drop + 1e-9:
            raise DamoError(
                f"INC autotune's best configuration drops the metric by {baseline - score:.4f} "
                f"(FP32 {baseline:.4f}, INT8 {score:.4f}), more than max_drop {max_drop}",
                "raise --max-drop, or use more calibration data",
            )
        return best, {
            "baseline": baseline,
            "metric": score,
            "relative_loss": (baseline - score) / baseline,
            "tolerable_loss": tolerable,
            "configs": space,
            "max_drop": max_drop,
        }

    def _hand_off(
        self, artifact: ModelArtifact, quantized: Any, example: tuple, target: str, info: dict
    ) -> ModelArtifact:
        import torch

        try:
            program = torch.export.export(quantized, example)
        except Exception as exc:
            first = first_line(exc)
            raise DamoError(f"could not re-export INC's quantized model: {first[:300]}") from exc
        if target == "openvino":
            import openvino as ov

            from damo_plugins.lib.openvino_graph import count_types, describe_ir, name_ports

            try:
                model = ov.convert_model(program)
            except Exception as exc:
                first = first_line(exc)
                raise DamoError(
                    f"OpenVINO could not convert INC's quantized model: {first[:300]}"
                ) from exc
            # torch.export leaves the IR's input dimensions dynamic; pin the artifact's static
            # shape (dynamic shapes run slower on CPU and break shape-derived inputs).
            static = [
                t.shape
                for t in artifact.inputs
                if all(isinstance(d, int) and d > 0 for d in t.shape)
            ]
            if len(static) == len(model.inputs) and not all(
                p.get_partial_shape().is_static for p in model.inputs
            ):
                model.reshape({i: ov.PartialShape(shape) for i, shape in enumerate(static)})
            name_ports(model, artifact)
            out = describe_ir(artifact.derive("openvino", model), model)
            info["fake_quantize"] = count_types(model, "FakeQuantize")
        else:
            from damo_plugins.core.artifact import onnx_artifact

            try:
                onnx_program = torch.onnx.export(
                    program,
                    example,
                    dynamo=True,
                    input_names=[t.name for t in artifact.inputs],
                    output_names=[t.name for t in artifact.outputs] or None,
                    verbose=False,
                )
                proto = onnx_program.model_proto
            except Exception as exc:
                first = first_line(exc)
                raise DamoError(
                    f"could not export INC's quantized model to ONNX: {first[:300]}",
                    "use target openvino, or --adapter onnxruntime for ONNX QDQ",
                ) from exc
            out = onnx_artifact(
                proto, provenance=list(artifact.provenance), meta=dict(artifact.meta)
            )
            info["quantize_linear"] = sum(
                1 for n in proto.graph.node if n.op_type == "QuantizeLinear"
            )
        out.meta["quantization"] = info
        return out


def _torch_run(model: Any) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    import torch

    def run(feeds: list[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            return [t.numpy() for t in _flat(model(*[torch.from_numpy(f) for f in feeds]))]

    return run


def _map_metric(valset: LabelledData) -> Callable[[Any], float]:
    """Evaluation function: COCO mAP@[.5:.95] of a (FP32 or INT8) PyTorch model."""
    return lambda model: valset.score(_torch_run(model))


def _agreement_metric(module: Any, validation: Iterable[Any] | None) -> Callable[[Any], float]:
    """Default metric: agreement of a model's outputs with the FP32 module's (1.0 for itself)."""
    import numpy as np
    import torch

    val = list(validation or [])
    if not val:
        raise DamoError(
            "accuracy control (max_drop) needs validation data",
            "give --val SRC / val: in the recipe",
        )
    names = list(getattr(module, "output_names", None) or [])

    def outputs(model: Any) -> list[list[np.ndarray]]:
        with torch.no_grad():
            return [
                [t.numpy() for t in _flat(model(*[torch.from_numpy(f) for f in as_feeds(x)]))]
                for x in val
            ]

    refs = outputs(module)
    return lambda model: float(
        np.mean([fidelity(r, o, names) for r, o in zip(refs, outputs(model))])
    )


def _flat(out: Any) -> list[Any]:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


# ---------------------------------------------------------------- decode on FX graphs
def _is_observer(node: Any) -> bool:
    return node.op == "call_module" and "activation_post_process" in str(node.target)


def fx_decode_nodes(gm: Any) -> set[Any]:
    """FX nodes of the decode tail of an exported (possibly prepared) ``GraphModule``."""
    import torch

    aten = torch.ops.aten
    convs = {
        aten.conv1d.default,
        aten.conv2d.default,
        aten.conv3d.default,
        aten.convolution.default,
        aten.conv_transpose2d.input,
    }
    signature = {
        aten.sigmoid.default,
        aten.softmax.int,
        aten._softmax.default,
        aten.log_softmax.int,
    }
    shape_ops = {aten.sym_size.int}

    def kind_of(node: Any) -> str:
        if node.op == "placeholder":
            return INPUT
        if node.op == "get_attr":
            return CONST
        if node.op == "call_function":
            if node.target in convs:
                return STOP
            if node.target is aten.linear.default and len(node.args) > 1:
                w = node.args[1]
                val = getattr(w, "meta", {}).get("val")
                if val is not None and val.dim() == 2 and min(val.shape) > 1:
                    return STOP
            if node.target in signature:
                return SIGNATURE
            if node.target in shape_ops:
                return SHAPE
        return OP

    output = next(n for n in gm.graph.nodes if n.op == "output")
    return walk_decode(list(output.all_input_nodes), lambda n: list(n.all_input_nodes), kind_of)


def strip_decode_observers(prepared: Any) -> list[str]:
    """Remove observers on the decode tail of a prepared PT2E model (in place).

    An observer goes if its input is a decode node or every consumer is one: the decode
    then reads float tensors and ``convert`` leaves it float. Returns the decode op names.
    """
    decode = fx_decode_nodes(prepared)
    graph = prepared.graph
    for node in list(graph.nodes):
        if not _is_observer(node) or not node.args:
            continue
        src = node.args[0]
        if src in decode or (node.users and all(u in decode for u in node.users)):
            node.replace_all_uses_with(src)
            graph.erase_node(node)
    graph.eliminate_dead_code()
    prepared.recompile()
    return sorted(n.name for n in decode if n.op == "call_function")
