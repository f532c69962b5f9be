"""NNCF adapter: post-training quantization of OpenVINO and ONNX models.

* ``nncf.quantize`` on an ``openvino.Model`` (target ``openvino``) or an ONNX ``ModelProto``
  (target ``onnx``, NNCF returns a QDQ model), with preset, subset size, fast bias
  correction, target device and ignored scope;
* ``nncf.quantize_with_accuracy_control`` when ``max_drop`` is given. The validation
  function is COCO mAP@[.5:.95] when the validation data is labelled
  (:class:`~damo_plugins.data.validation.LabelledDetections`; ``max_drop`` is then an
  absolute mAP drop), else agreement with the FP32 model (:func:`fidelity`, no labels
  needed), or the caller's ``validation_fn``. The FP32 and INT8 values are measured
  before/after and reported; a result outside ``max_drop`` is an error, not a silent pass;
* ``mode="weights"``: weight-only compression (``nncf.compress_weights``).

PyTorch models go through OpenVINO conversion (or ONNX export for target ``onnx``) first.
``torch_backend=True`` uses NNCF's own PyTorch path instead (its function-hook mode; the
result is converted to OpenVINO). That path runs its fake-quantizers through a C++
extension that is compiled on first use (~1 min on an idle core here, more on a busy one;
needs a C++ compiler, ninja and torchao) and cached under ``~/.cache/torch_extensions``.
We check those up front and raise NNCF's extension-load timeout (60 s by default, too short
for a first build on a busy machine) unless the user set ``NNCF_EXTENSION_LOAD_TIMEOUT``.

The detector decode is kept in floating point by default (``keep_head_fp``): its ops go into
``IgnoredScope(names=...)``, found structurally (see :mod:`damo_plugins.lib.decode`).
For OpenVINO the decode's broadcast constants are expanded first, which avoids a CPU plugin
compile failure on DAMO-YOLO (see :mod:`damo_plugins.lib.openvino_graph`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from damo_plugins.core.adapter import (
    AGREEMENT,
    MAP,
    Adapter,
    AdapterOptions,
    LabelledData,
    is_labelled,
)
from damo_plugins.core.artifact import ModelArtifact, onnx_artifact
from damo_plugins.core.errors import DamoError, UnsupportedError, first_line
from damo_plugins.lib.decode import (
    CONST,
    INPUT,
    OP,
    SIGNATURE,
    STOP,
    name_onnx_nodes,
    onnx_decode_nodes,
    walk_decode,
)
from damo_plugins.lib.fidelity import as_feeds, fidelity

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

#: NNCF's extension-load timeout when the user has not set one: a first build of the C++
#: extension took ~60 s on an idle core here and several minutes on a loaded machine.
EXTENSION_TIMEOUT_S = 900


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


class NNCFQuantizeOptions(AdapterOptions):
    """NNCF's own settings of ``nncf.quantize`` (recipe keys of ``quantize: {adapter: nncf}``)."""

    preset: Literal["performance", "mixed"] = Field(
        "performance",
        description="performance: symmetric activations; mixed: asymmetric activations "
        "(tighter ranges for activations not centred on zero)",
    )
    fast_bias_correction: bool = Field(
        True,
        description="false: NNCF's slower, more exact bias correction (measured on the demo "
        "models: INT8 loss 0.1-0.8 mAP points -> about none, quantization ~2x slower; "
        "docs/benchmarks/training.md)",
    )
    target_device: Literal["ANY", "CPU", "GPU", "NPU", "CPU_SPR"] = Field(
        "ANY", description="device whose INT8 kernels the quantizer placement targets"
    )
    model_type: Literal["transformer"] | None = Field(
        None, description="transformer: NNCF's special handling of attention blocks"
    )
    torch_backend: bool = Field(
        False,
        description="quantize the nn.Module on NNCF's torch path (builds a C++ extension on "
        "first use), then convert to OpenVINO",
    )
    overflow_fix: Literal["auto", "enable", "first_layer_only", "disable"] = Field(
        "auto",
        description="7-bit weights where 8-bit ones saturate: enable (every layer), "
        "first_layer_only (NNCF's default) or disable; auto = enable on a CPU without VNNI, whose "
        "INT8 kernels sum products in 16 bits (measured on the demo model: held-out mAP "
        "-2.6 points with first_layer_only, -0.35 with enable), else first_layer_only",
    )


class NNCFAdapter(Adapter):
    name = "nncf"
    backend = "nncf"
    backend_distribution = "nncf"
    capabilities = ("quantize", "quantize_with_accuracy_control", "compress_weights")
    options = {"quantize": NNCFQuantizeOptions}

    #: OpenVINO device families NNCF can place quantizers for (its ``target_device``)
    TARGETS = ("CPU", "GPU", "NPU")

    def devices(self) -> list[str]:
        """Target devices NNCF can quantize for that are present on this machine.

        NNCF runs nothing itself: its INT8 models run on OpenVINO, so a target is present
        when OpenVINO sees that device (``GPU.0`` counts as ``GPU``). Listing every target
        NNCF knows told users a CPU-only machine could deploy to a GPU and an NPU. Without
        OpenVINO only the CPU (the ONNX path) is certain.
        """
        self.require_backend()
        from damo_plugins.lib.openvino_graph import ov_core

        try:
            available = ov_core().available_devices
        except ImportError:
            return ["CPU"]
        present = {d.split(".")[0] for d in available}
        return [t for t in self.TARGETS if t in present] or ["CPU"]

    # ----------------------------------------------------------------- input
    def _source(self, artifact: ModelArtifact, target: str, torch_backend: bool) -> tuple[str, Any]:
        """The model NNCF will work on, in the target's format."""
        if artifact.format == "torch" and torch_backend:
            import copy

            if target != "openvino":
                raise UnsupportedError(
                    "NNCF's torch path hands its INT8 model to OpenVINO; it does not give ONNX",
                    "use target openvino with torch_backend, or drop torch_backend for ONNX QDQ",
                )
            return "torch", copy.deepcopy(artifact.model).eval()
        if target == "openvino":
            if artifact.format == "openvino":
                return "openvino", artifact.model.clone()
            from damo_plugins.core.manager import get_manager

            ov_adapter = get_manager().adapter_for_format("openvino")
            return "openvino", ov_adapter.convert(artifact).model
        if target == "onnx":
            if artifact.format == "onnx":
                import onnx

                proto = onnx.ModelProto()
                proto.CopyFrom(artifact.model)
                return "onnx", name_onnx_nodes(proto)
            if artifact.format == "torch":
                from damo_plugins.lib.onnx_export import export_onnx

                return "onnx", name_onnx_nodes(export_onnx(artifact))
            raise UnsupportedError(
                "NNCF cannot turn an OpenVINO IR into ONNX",
                "quantize the ONNX or PyTorch model, or use target openvino",
            )
        raise UnsupportedError(f"NNCF adapter: unknown target '{target}'", "use openvino or onnx")

    def _ignored(
        self,
        nncf: Any,
        kind: str,
        model: Any,
        keep_head_fp: bool,
        user: Mapping[str, Any] | None,
        example: Any = None,
    ) -> tuple[Any, list[str]]:
        head: list[str] = []
        if keep_head_fp and kind == "openvino":
            from damo_plugins.lib.openvino_graph import broadcast_decode_constants, decode_nodes

            head = decode_nodes(model)
            if head:
                broadcast_decode_constants(model, head)
                head = decode_nodes(model)
        elif keep_head_fp and kind == "onnx":
            head = onnx_decode_nodes(model)
        elif keep_head_fp and kind == "torch":
            head = torch_decode_nodes(model, example)
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
        keep_head_fp: bool = True,
        ignored_scope: Mapping[str, Any] | None = None,
        max_drop: float | None = None,
        validation: Iterable[Any] | None = None,
        validation_fn: Callable[[Any, Iterable[Any]], float] | None = None,
        seed: int = 0,
        preset: str = "performance",
        fast_bias_correction: bool = True,
        target_device: str = "ANY",
        model_type: str | None = None,
        torch_backend: bool = False,
        overflow_fix: str = "auto",
    ) -> ModelArtifact:
        """See :meth:`Adapter.quantize`; the NNCF options are :class:`NNCFQuantizeOptions`.

        ``seed`` is not used: NNCF's statistics collection and accuracy control are
        deterministic given the data.
        """
        nncf = self.require_backend()
        target = target or ("onnx" if artifact.format == "onnx" else "openvino")
        if torch_backend and artifact.format == "torch":
            check_torch_backend()
        kind, model = self._source(artifact, target, torch_backend)
        calib = list(calibration) if not hasattr(calibration, "__len__") else calibration
        if len(calib) == 0:  # type: ignore[arg-type]
            raise DamoError("the calibration set is empty", "give a folder or file with samples")
        if mode == "weights":
            return self._compress_weights(nncf, artifact, kind, model, target)
        if mode != "int8":
            raise DamoError(f"NNCF adapter: unknown mode '{mode}'", "use int8 or weights")
        example = None
        if kind == "torch":
            import torch

            example = torch.from_numpy(artifact.example_inputs()[0])
        scope, head = self._ignored(nncf, kind, model, keep_head_fp, ignored_scope, example)
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
            overflow_fix = _overflow_fix(overflow_fix, target_device)
            params["advanced_parameters"] = _advanced(overflow_fix)
            if scope is not None:
                params["ignored_scope"] = scope
        except (KeyError, ValueError) as exc:
            raise DamoError(f"NNCF adapter: invalid option ({exc})") from exc
        info: dict[str, Any] = {
            "adapter": self.name,
            "backend_version": self.backend_version(),
            "mode": "int8",
            "preset": preset,
            "fast_bias_correction": fast_bias_correction,
            "target_device": target_device,
            "subset_size": params["subset_size"],
            "overflow_fix": overflow_fix,
            "kept_fp": head,
            "accuracy_control": max_drop is not None,
        }
        if kind == "torch":
            info["torch_backend"] = True
        with _quiet(), _extension_timeout(kind):
            try:
                if max_drop is not None:
                    quantized = self._with_accuracy_control(
                        nncf,
                        kind,
                        model,
                        dataset,
                        validation,
                        validation_fn,
                        max_drop,
                        params,
                        info,
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
            return self._result(artifact, kind, quantized, target, info, keep_head_fp)

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
        info: dict[str, Any],
    ) -> Any:
        import numpy as np

        if validation is None:
            raise DamoError(
                "accuracy control (max_drop) needs validation data",
                "give --val SRC / val: in the recipe",
            )
        if kind == "torch":
            raise UnsupportedError(
                "accuracy control is not offered on NNCF's torch path here", "drop torch_backend"
            )
        items: Any = validation if is_labelled(validation) else list(validation)
        if len(items) == 0:
            raise DamoError("the validation set is empty")
        transform = _transform(kind, model)
        if validation_fn is not None:
            # The caller's metric sees the items themselves, as in NNCF's own examples.
            info["accuracy_metric"] = "user"
            val_ds = nncf.Dataset(list(items), transform)
            advanced = params.pop("advanced_parameters", None)
            return nncf.quantize_with_accuracy_control(
                model,
                dataset,
                val_ds,
                validation_fn,
                max_drop=max_drop,
                advanced_quantization_parameters=advanced,
                **params,
            )
        # Our metrics see item indices: the mAP needs to know which image each output is of.
        val_ds = nncf.Dataset(list(range(len(items))), lambda i: transform(items[i]))
        every = list(range(len(items)))
        if is_labelled(items):
            metric_name, fn = MAP, _map_fn(items, kind)
            baseline = fn(_candidate(kind, model), every)[0]
            if not np.isfinite(baseline) or baseline <= 0:
                raise DamoError(
                    f"the FP32 model scores mAP {baseline:.4f} on {items.source}: there is no "
                    "accuracy to keep, so max_drop means nothing",
                    "check that the validation data matches the model (classes, image content), "
                    "or give plain images as --val to control agreement with FP32 instead",
                )
        else:
            metric_name, fn = AGREEMENT, _agreement_fn(kind, model, list(items))
            baseline = 1.0  # the FP32 model agrees with itself
        quantized = nncf.quantize_with_accuracy_control(
            model,
            dataset,
            val_ds,
            fn,
            max_drop=max_drop,
            advanced_quantization_parameters=params.pop("advanced_parameters", None),
            **params,
        )
        final = fn(_candidate(kind, quantized), every)[0]
        info.update(
            accuracy_metric=metric_name,
            metric_fp32=round(float(baseline), 4),
            metric_int8=round(float(final), 4),
            metric_drop=round(float(baseline - final), 4),
            max_drop=max_drop,
            validation_samples=len(items),
        )
        if baseline - final > max_drop + 1e-9:
            raise DamoError(
                f"NNCF could not keep the {metric_name} drop within max_drop {max_drop}: "
                f"FP32 {baseline:.4f}, best INT8 {final:.4f} (drop {baseline - final:.4f})",
                "raise --max-drop, calibrate on more representative data, or validate on more images",
            )
        return quantized

    def _compress_weights(
        self, nncf: Any, artifact: ModelArtifact, kind: str, model: Any, target: str
    ) -> ModelArtifact:
        with _quiet():
            try:
                compressed = nncf.compress_weights(model)
            except Exception as exc:
                first = first_line(exc)
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
        self,
        artifact: ModelArtifact,
        kind: str,
        model: Any,
        target: str,
        info: dict,
        keep_head_fp: bool = False,
    ) -> ModelArtifact:
        if kind == "torch":
            import openvino as ov
            import torch

            example = torch.from_numpy(artifact.example_inputs()[0])
            with warnings.catch_warnings(), torch.no_grad():
                # Tracing NNCF's fake-quantizers warns about every scale it reads.
                warnings.simplefilter("ignore")
                try:
                    model = ov.convert_model(model, example_input=example)
                except Exception as exc:
                    first = first_line(exc)
                    raise DamoError(
                        f"OpenVINO could not convert NNCF's quantized PyTorch model: {first[:300]}",
                        "drop torch_backend (the default path quantizes the OpenVINO model)",
                    ) from exc
            if keep_head_fp:
                from damo_plugins.lib.openvino_graph import broadcast_decode_constants, decode_nodes

                # The same CPU-plugin compile workaround as on the OpenVINO path.
                broadcast_decode_constants(model, decode_nodes(model))
            kind = "openvino"
        if kind == "openvino":
            from damo_plugins.lib.openvino_graph import count_types, describe_ir

            out = describe_ir(artifact.derive("openvino", model), model)
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


class _Runner:
    """Runs whatever NNCF hands a validation function: an OpenVINO compiled model, an ONNX
    ``ModelProto`` (NNCF's ONNX backend) or an ONNX Runtime session."""

    def __init__(self) -> None:
        self._session: tuple[Any, Any] | None = None

    def __call__(self, candidate: Any, feeds: list[np.ndarray]) -> list[np.ndarray]:
        import numpy as np

        if hasattr(candidate, "SerializeToString"):
            if self._session is None or self._session[0] is not candidate:
                from damo_plugins.core.onnx_utils import ort_session

                # one at a time: NNCF tries one candidate model after another
                self._session = (candidate, ort_session(candidate))
            candidate = self._session[1]
        if hasattr(candidate, "get_inputs"):  # an ONNX Runtime session
            names_in = [i.name for i in candidate.get_inputs()]
            return list(candidate.run(None, dict(zip(names_in, feeds))))
        return [np.asarray(v) for v in candidate(feeds).values()]


def _compile_f32(model: Any) -> Any:
    """Compile on CPU in true f32, as NNCF's accuracy control does for its candidates.

    OpenVINO's CPU default is bf16 on CPUs with AVX512-BF16/AMX: scoring the FP32 baseline or
    the final INT8 model that way adds ~1e-3 of noise to the mAP, enough to turn a result NNCF
    accepted into a reported failure of ``max_drop``.
    """
    from damo_plugins.lib.openvino_graph import ov_core

    return ov_core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def _candidate(kind: str, model: Any) -> Any:
    """What NNCF would hand a validation function for ``model`` (compiled, for OpenVINO)."""
    if kind == "openvino":
        return _compile_f32(model)
    return model


def _map_fn(
    valset: LabelledData, kind: str
) -> Callable[[Any, Iterable[int]], tuple[float, list[list[np.ndarray]] | None]]:
    """Validation function: COCO mAP@[.5:.95] of a candidate on the labelled images.

    On OpenVINO it also returns each image's raw outputs, which puts NNCF in its "logits"
    mode: quantizers are ranked by how much they change the outputs. NNCF 3.4 has no such
    ranking for ONNX models (``UnsupportedBackendError``), so there it returns the mAP
    alone ("metric" mode: quantizers are ranked by the mAP of the ranking subset).
    """
    run = _Runner()
    with_outputs = kind == "openvino"

    def validation_fn(
        candidate: Any, data: Iterable[int]
    ) -> tuple[float, list[list[np.ndarray]] | None]:
        idx = [int(i) for i in data]
        outs = [run(candidate, [valset[i]]) for i in idx]
        return valset.score_outputs(outs, idx), outs if with_outputs else None

    return validation_fn


def _agreement_fn(
    kind: str, model: Any, items: list[Any]
) -> Callable[[Any, Iterable[Any]], tuple[float, list[float]]]:
    """Validation function scoring agreement with the FP32 model (1.0 for FP32 itself)."""
    import numpy as np

    if kind == "openvino":
        compiled = _compile_f32(model)
        refs = [[np.asarray(v) for v in compiled(as_feeds(x)).values()] for x in items]
        names = [sorted(o.get_names())[0] if o.get_names() else "" for o in model.outputs]
    else:
        from damo_plugins.core.onnx_utils import ort_session

        sess = ort_session(model)
        in_names = [i.name for i in sess.get_inputs()]
        refs = [list(sess.run(None, dict(zip(in_names, as_feeds(x))))) for x in items]
        names = [o.name for o in model.graph.output]

    run = _Runner()

    def validation_fn(candidate: Any, data: Iterable[int]) -> tuple[float, list[float]]:
        scores = [fidelity(refs[i], run(candidate, as_feeds(items[i])), names) for i in data]
        return float(np.mean(scores)) if scores else 0.0, scores

    return validation_fn


# ------------------------------------------------------------------ NNCF's torch path
def check_torch_backend() -> None:
    """Fail early and clearly if NNCF's PyTorch path cannot run here.

    It needs ``torchao`` (imported by NNCF's torch backend without being declared), and a
    C++ compiler plus ninja to build (or re-check) its fake-quantize extension.
    """
    missing = []
    try:
        import torchao  # noqa: F401
    except ImportError:
        missing.append("torchao (pip install torchao)")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None and shutil.which("g++") is None:
        missing.append(f"a C++ compiler ({compiler} / g++ not on PATH)")
    try:
        from torch.utils.cpp_extension import is_ninja_available

        ninja = is_ninja_available()
    except Exception:
        ninja = False
    if not ninja:
        missing.append("ninja (pip install ninja)")
    if missing:
        raise UnsupportedError(
            "NNCF's PyTorch path (torch_backend) cannot run here: it needs " + ", ".join(missing),
            "install them, or drop torch_backend (the default converts to OpenVINO first and "
            "needs none of this)",
        )


@contextlib.contextmanager
def _extension_timeout(kind: str) -> Iterator[None]:
    """Give NNCF's C++ extension build time, and turn its timeout into a clear error."""
    if kind != "torch":
        yield
        return
    var = "NNCF_EXTENSION_LOAD_TIMEOUT"
    old = os.environ.get(var)
    if old is None:
        os.environ[var] = str(EXTENSION_TIMEOUT_S)
    try:
        yield
    except Exception as exc:
        if type(exc).__name__ != "ExtensionLoaderTimeoutException":
            raise
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        cleanup = next((ln for ln in lines if ln.startswith("rm -rf")), "")
        raise DamoError(
            "NNCF's C++ extension was not built in time "
            f"(NNCF_EXTENSION_LOAD_TIMEOUT={os.environ.get(var)} s)"
            + (
                f"; a leftover lock from an interrupted build is likely: {cleanup}"
                if cleanup
                else ""
            ),
            "retry (the build is cached once it finishes), raise NNCF_EXTENSION_LOAD_TIMEOUT, "
            "or drop torch_backend",
        ) from exc
    finally:
        if old is None:
            os.environ.pop(var, None)


def torch_decode_nodes(model: Any, example: Any) -> list[str]:
    """NNCF torch node names of the decode tail (the names NNCF's ``IgnoredScope`` takes).

    The graph is NNCF's own (function-hook tracing), so the names match what it quantizes.
    """
    try:
        from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import build_nncf_graph

        graph = build_nncf_graph(model, example)
    except Exception as exc:
        first = first_line(exc)
        raise DamoError(
            f"NNCF could not trace the PyTorch model: {first[:300]}",
            "drop torch_backend (the default path converts to OpenVINO first)",
        ) from exc

    def kind_of(node: Any) -> str:
        t = node.node_type
        if t == "nncf_model_input":
            return INPUT
        if t == "nncf_model_const":
            return CONST
        if t.startswith("conv"):
            return STOP
        if t in ("linear", "matmul", "addmm"):
            # A learned layer (2-D weight) is a boundary; the integral's bin vector is not.
            for edge in graph.get_input_edges(node):
                shape = list(edge.tensor_shape or [])
                src = edge.from_node.node_type
                if src == "nncf_model_const" and len(shape) == 2 and min(shape) > 1:
                    return STOP
        if t in ("sigmoid", "softmax", "log_softmax"):
            return SIGNATURE
        return OP

    outputs = [n for n in graph.get_all_nodes() if n.node_type == "nncf_model_output"]
    found = walk_decode(outputs, graph.get_previous_nodes, kind_of)
    return sorted(n.node_name for n in found if n.node_type != "nncf_model_output")


def _overflow_fix(option: str, target_device: str) -> str:
    """``auto``: 7-bit weights (``enable``) when the INT8 kernels of the CPU this runs on sum
    u8 x s8 products in 16 bits (no VNNI), where 8-bit weights saturate; NNCF's own default
    (``first_layer_only``) on a VNNI CPU or for another device."""
    if option != "auto":
        return option
    from damo_plugins.lib.machine import has_vnni

    on_cpu = target_device.upper() in ("ANY", "CPU")
    return "enable" if on_cpu and not has_vnni() else "first_layer_only"


def _advanced(overflow_fix: str) -> Any:
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        OverflowFix,
    )

    return AdvancedQuantizationParameters(overflow_fix=OverflowFix(overflow_fix))
