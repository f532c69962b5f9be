"""NNCF adapter: post-training quantization of OpenVINO and ONNX models.

* ``nncf.quantize`` on an ``openvino.Model`` (target ``openvino``) or an ONNX ``ModelProto``
  (target ``onnx``, NNCF returns a QDQ model), with preset, subset size, fast bias
  correction, target device and ignored scope;
* ``nncf.quantize_with_accuracy_control`` when ``max_drop`` is given, with a validation
  function — by default "agreement with the FP32 model" (:func:`fidelity`), so no labels
  are needed; pass ``validation_fn`` for a real metric (e.g. mAP);
* ``mode="weights"``: weight-only compression (``nncf.compress_weights``).

PyTorch models go through OpenVINO conversion (or ONNX export for target ``onnx``) first:
NNCF's own torch path compiles a C++ extension on first use (~3 minutes here, needs g++,
ninja and torchao). ``torch_backend=True`` allows it for those who want it.

The detector decode is kept in floating point by default (``keep_head_fp``): its ops go into
``IgnoredScope(names=...)``, found structurally (see :mod:`damo_plugins.passes.quantize`).
For OpenVINO the decode's broadcast constants are expanded first, which avoids a CPU plugin
compile failure on DAMO-YOLO (see :mod:`damo_openvino.graph`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from damo_plugins.adapter import Adapter
from damo_plugins.artifact import ModelArtifact, onnx_artifact
from damo_plugins.errors import DamoError, UnsupportedError
from damo_plugins.passes.quantize import as_feeds, fidelity, name_onnx_nodes, onnx_decode_nodes


@contextlib.contextmanager
def _quiet() -> Any:
    """NNCF logs every skipped quantizer at INFO; keep our command line readable."""
    log = logging.getLogger("nncf")
    old = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(old)


class NNCFAdapter(Adapter):
    name = "nncf"
    backend = "nncf"
    backend_distribution = "nncf"
    capabilities = ("quantize", "quantize_with_accuracy_control", "compress_weights")

    def devices(self) -> list[str]:
        # NNCF quantizes for a target device; it runs nothing itself.
        return ["CPU", "GPU", "NPU"]

    # ----------------------------------------------------------------- input
    def _source(self, artifact: ModelArtifact, target: str, torch_backend: bool) -> tuple[str, Any]:
        """The model NNCF will work on, in the target's format."""
        if artifact.format == "torch" and torch_backend:
            import copy

            return "torch", copy.deepcopy(artifact.model).eval()
        if target == "openvino":
            if artifact.format == "openvino":
                return "openvino", artifact.model.clone()
            from damo_plugins.manager import get_manager

            ov_adapter = get_manager().adapter_for_format("openvino")
            return "openvino", ov_adapter.convert(artifact).model
        if target == "onnx":
            if artifact.format == "onnx":
                import onnx

                proto = onnx.ModelProto()
                proto.CopyFrom(artifact.model)
                return "onnx", name_onnx_nodes(proto)
            if artifact.format == "torch":
                from damo_plugins.passes.export import export_onnx

                return "onnx", name_onnx_nodes(export_onnx(artifact))
            raise UnsupportedError(
                "NNCF cannot turn an OpenVINO IR into ONNX",
                "quantize the ONNX or PyTorch model, or use target openvino",
            )
        raise UnsupportedError(f"NNCF adapter: unknown target '{target}'", "use openvino or onnx")

    def _ignored(
        self, nncf: Any, kind: str, model: Any, keep_head_fp: bool, user: dict | None
    ) -> tuple[Any, list[str]]:
        head: list[str] = []
        if keep_head_fp and kind == "openvino":
            from damo_openvino.graph import broadcast_decode_constants, decode_nodes

            head = decode_nodes(model)
            if head:
                broadcast_decode_constants(model, head)
                head = decode_nodes(model)
        elif keep_head_fp and kind == "onnx":
            head = onnx_decode_nodes(model)
        user = user or {}
        names = sorted(set(head) | set(user.get("names") or []))
        types = list(user.get("types") or [])
        patterns = list(user.get("patterns") or [])
        if not (names or types or patterns):
            return None, head
        # Our own names exist by construction; the user's are validated so a typo is an error.
        validate = bool(user.get("names") or types or patterns)
        return nncf.IgnoredScope(
            names=names, types=types, patterns=patterns, validate=validate
        ), head

    # --------------------------------------------------------------- quantize
    def quantize(
        self,
        artifact: ModelArtifact,
        calibration: Iterable[Any],
        *,
        target: str | None = None,
        mode: str = "int8",
        subset_size: int = 300,
        preset: str = "performance",
        fast_bias_correction: bool = True,
        target_device: str = "ANY",
        model_type: str | None = None,
        keep_head_fp: bool = True,
        ignored_scope: dict | None = None,
        max_drop: float | None = None,
        validation: Iterable[Any] | None = None,
        validation_fn: Callable[[Any, Iterable[Any]], float] | None = None,
        torch_backend: bool = False,
        **_: Any,
    ) -> ModelArtifact:
        nncf = self.require_backend()
        target = target or ("onnx" if artifact.format == "onnx" else "openvino")
        kind, model = self._source(artifact, target, torch_backend)
        calib = list(calibration) if not hasattr(calibration, "__len__") else calibration
        if len(calib) == 0:  # type: ignore[arg-type]
            raise DamoError("the calibration set is empty", "give a folder or file with samples")
        if mode == "weights":
            return self._compress_weights(nncf, artifact, kind, model, target)
        if mode != "int8":
            raise DamoError(f"NNCF adapter: unknown mode '{mode}'", "use int8 or weights")
        if kind == "torch" and keep_head_fp:
            raise UnsupportedError(
                "on NNCF's torch path the detector head cannot be kept in floating point automatically",
                "set keep_head_fp: false and give an ignored_scope of NNCF torch node names, "
                "or drop torch_backend (the default OpenVINO path keeps the head float)",
            )
        scope, head = self._ignored(nncf, kind, model, keep_head_fp, ignored_scope)
        dataset = nncf.Dataset(calib, _transform(kind, model))
        try:
            params: dict[str, Any] = {
                "preset": nncf.QuantizationPreset(preset),
                "subset_size": int(min(subset_size, len(calib))),  # type: ignore[arg-type]
                "fast_bias_correction": fast_bias_correction,
                "target_device": nncf.TargetDevice[target_device.upper()],
            }
            if model_type:
                params["model_type"] = nncf.ModelType(model_type)
            if scope is not None:
                params["ignored_scope"] = scope
        except (KeyError, ValueError) as exc:
            raise DamoError(f"NNCF adapter: invalid option ({exc})") from exc
        with _quiet():
            try:
                if max_drop is not None:
                    quantized = self._with_accuracy_control(
                        nncf, kind, model, dataset, validation, validation_fn, max_drop, params
                    )
                else:
                    quantized = nncf.quantize(model, dataset, **params)
            except DamoError:
                raise
            except nncf.ValidationError as exc:
                raise DamoError(
                    f"NNCF rejected the ignored scope: {str(exc).splitlines()[0][:300]}",
                    "check the names/types/patterns in ignored_scope",
                ) from exc
        return self._result(
            artifact,
            kind,
            quantized,
            target,
            {
                "adapter": self.name,
                "backend_version": self.backend_version(),
                "mode": "int8",
                "preset": preset,
                "subset_size": params["subset_size"],
                "kept_fp": head,
                "accuracy_control": max_drop is not None,
            },
        )

    def _with_accuracy_control(
        self,
        nncf: Any,
        kind: str,
        model: Any,
        dataset: Any,
        validation: Iterable[Any] | None,
        validation_fn: Callable[..., Any] | None,
        max_drop: float,
        params: dict[str, Any],
    ) -> Any:
        if validation is None:
            raise DamoError(
                "accuracy control (max_drop) needs validation data",
                "give --val SRC / val: in the recipe",
            )
        items = list(validation)
        if not items:
            raise DamoError("the validation set is empty")
        if kind == "torch":
            raise UnsupportedError(
                "accuracy control is not offered on NNCF's torch path here", "drop torch_backend"
            )
        if validation_fn is None:
            validation_fn = _agreement_fn(kind, model, items)
            val_items: list[Any] = list(enumerate(items))
            transform = _transform(kind, model)
            val_ds = nncf.Dataset(val_items, lambda it: transform(it[1]))
        else:
            val_ds = nncf.Dataset(items, _transform(kind, model))
        return nncf.quantize_with_accuracy_control(
            model, dataset, val_ds, validation_fn, max_drop=max_drop, **params
        )

    def _compress_weights(
        self, nncf: Any, artifact: ModelArtifact, kind: str, model: Any, target: str
    ) -> ModelArtifact:
        with _quiet():
            try:
                compressed = nncf.compress_weights(model)
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise DamoError(f"NNCF weight compression failed: {first[:300]}") from exc
        return self._result(
            artifact,
            kind,
            compressed,
            target,
            {
                "adapter": self.name,
                "backend_version": self.backend_version(),
                "mode": "weights",
            },
        )

    def _result(
        self, artifact: ModelArtifact, kind: str, model: Any, target: str, info: dict
    ) -> ModelArtifact:
        if kind == "torch":
            import openvino as ov
            import torch

            example = torch.from_numpy(artifact.example_inputs()[0])
            model = ov.convert_model(model, example_input=example)
            kind = "openvino"
        if kind == "openvino":
            from damo_openvino.adapter import _param_count, _specs
            from damo_openvino.graph import count_types

            out = artifact.derive("openvino", model)
            out.inputs, out.outputs = _specs(model.inputs), _specs(model.outputs)
            out.meta["params"] = _param_count(model)
            info["fake_quantize"] = count_types(model, "FakeQuantize")
        else:
            out = onnx_artifact(
                model, provenance=list(artifact.provenance), meta=dict(artifact.meta)
            )
            info["quantize_linear"] = sum(
                1 for n in model.graph.node if n.op_type == "QuantizeLinear"
            )
        out.meta["quantization"] = info
        return out


def _transform(kind: str, model: Any) -> Callable[[Any], Any]:
    """Calibration item -> what NNCF feeds the backend model."""
    if kind == "onnx":
        names = [
            i.name
            for i in model.graph.input
            if i.name not in {x.name for x in model.graph.initializer}
        ]
        return lambda item: dict(zip(names, as_feeds(item)))
    if kind == "torch":
        import torch

        return lambda item: torch.from_numpy(as_feeds(item)[0])
    return lambda item: as_feeds(item)


def _agreement_fn(
    kind: str, model: Any, items: list[Any]
) -> Callable[[Any, Iterable[Any]], tuple[float, list[float]]]:
    """Validation function scoring agreement with the FP32 model (1.0 for FP32 itself)."""
    if kind == "openvino":
        from damo_openvino.adapter import core

        compiled = core().compile_model(model, "CPU")
        refs = [[np.asarray(v) for v in compiled(as_feeds(x)).values()] for x in items]
        names = [sorted(o.get_names())[0] if o.get_names() else "" for o in model.outputs]
    else:
        from damo_plugins.onnx_utils import ort_session

        sess = ort_session(model)
        in_names = [i.name for i in sess.get_inputs()]
        refs = [list(sess.run(None, dict(zip(in_names, as_feeds(x))))) for x in items]
        names = [o.name for o in model.graph.output]

    sessions: dict[int, Any] = {}

    def run(candidate: Any, feeds: list[np.ndarray]) -> list[np.ndarray]:
        if hasattr(candidate, "SerializeToString"):  # NNCF's ONNX backend hands a ModelProto
            if id(candidate) not in sessions:
                from damo_plugins.onnx_utils import ort_session

                sessions.clear()  # one at a time: NNCF tries one candidate model after another
                sessions[id(candidate)] = (candidate, ort_session(candidate))
            candidate = sessions[id(candidate)][1]
        if hasattr(candidate, "get_inputs"):  # an ONNX Runtime session
            names_in = [i.name for i in candidate.get_inputs()]
            return list(candidate.run(None, dict(zip(names_in, feeds))))
        return [np.asarray(v) for v in candidate(feeds).values()]

    def validation_fn(candidate: Any, data: Iterable[Any]) -> tuple[float, list[float]]:
        scores = [fidelity(refs[i], run(candidate, as_feeds(x)), names) for i, x in data]
        return float(np.mean(scores)) if scores else 0.0, scores

    return validation_fn
