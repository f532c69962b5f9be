"""The model artifact: one type for a model in PyTorch, ONNX or OpenVINO IR form.

Passes take an artifact and return a new one; the pipeline saves each and records what was
done to it (``provenance``). PyTorch models are saved as a *safe* checkpoint: a dictionary
of tensors and plain values (loadable with ``torch.load(..., weights_only=True)``) holding
the weights plus the recipe to rebuild the architecture: a registered builder, its keyword
arguments and the structural transforms applied since (``arch``). No pickled code is ever
written or read. OpenVINO IR is read and written through the adapter that owns the format.
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from damo_plugins.core.errors import DamoError, first_line
from damo_plugins.core.io import atomic_path, check_input_file, explain_write_failure

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import onnx
    import torch

    from damo_plugins.core.manager import PluginManager

FORMATS = ("torch", "onnx", "openvino")
CHECKPOINT_KEY = "damo_plugins_checkpoint"
SUFFIX = {"torch": ".pt", "onnx": ".onnx", "openvino": ".xml"}


@dataclass
class TensorSpec:
    """Name, shape (ints, or strings for dynamic axes) and dtype of one model input/output."""

    name: str
    shape: list[int | str]
    dtype: str = "float32"
    #: lengths for the dynamic axes when the model must run (verification, calibration): the
    #: shape the model was exercised at before a step made axes dynamic (set by the step
    #: runner), so a dynamic-size export is checked at its real size, not at 1x1
    example: list[int] | None = field(default=None, compare=False, repr=False)

    def concrete(self, fill: int = 1) -> list[int]:
        ex = self.example if self.example and len(self.example) == len(self.shape) else None
        return [
            d if isinstance(d, int) and d >= 0 else (ex[i] if ex else fill)
            for i, d in enumerate(self.shape)
        ]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(str(d["name"]), list(d["shape"]), str(d.get("dtype", "float32")))


@dataclass
class ModelArtifact:
    """A model plus what is known about it.

    ``model`` is a ``torch.nn.Module``, an ``onnx.ModelProto`` or an ``openvino.Model``
    according to ``format``. ``arch`` (PyTorch only) says how to rebuild the architecture
    from a registered builder: ``{"builder": name, "kwargs": {...}, "transforms": [...]}``.
    """

    format: str
    model: Any
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    provenance: list[dict[str, Any]] = field(default_factory=list)
    arch: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    #: ONNX Runtime session of ``model`` (built on first ``run``; keyed by the model object)
    _session: tuple[int, Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise DamoError(f"unknown model format '{self.format}'", f"one of {FORMATS}")

    # --------------------------------------------------------------- derived
    def derive(self, fmt: str | None = None, model: Any = None, **changes: Any) -> ModelArtifact:
        """A new artifact with the same provenance and specs, optionally a new model/format."""
        new = ModelArtifact(
            format=fmt or self.format,
            model=self.model if model is None else model,
            inputs=[copy.copy(t) for t in self.inputs],
            outputs=[copy.copy(t) for t in self.outputs],
            provenance=copy.deepcopy(self.provenance),
            arch=copy.deepcopy(self.arch),
            meta=copy.deepcopy(self.meta),
            path=None,
        )
        for k, v in changes.items():
            setattr(new, k, v)
        return new

    @property
    def input_shape(self) -> list[int]:
        return self.inputs[0].concrete() if self.inputs else []

    def example_inputs(self, seed: int = 0, batch: int | None = None) -> list[np.ndarray]:
        """Deterministic random inputs matching the input spec (dynamic axes -> 1)."""
        import numpy as np

        rng = np.random.default_rng(seed)
        feeds = []
        for spec in self.inputs:
            shape = spec.concrete()
            if batch is not None and shape:
                shape[0] = batch
            check_elements(shape, f"input '{spec.name}'")
            if spec.dtype.startswith("float"):
                feeds.append(rng.standard_normal(shape).astype(spec.dtype))
            else:
                feeds.append(rng.integers(0, 2, shape).astype(spec.dtype))
        return feeds

    def run(
        self, feeds: Sequence[np.ndarray], manager: PluginManager | None = None
    ) -> list[np.ndarray]:
        """One inference on numpy inputs, whatever the format; outputs as a flat list."""
        import numpy as np

        if self.format == "torch":
            import torch

            module = self.model
            was_training = module.training
            module.eval()
            try:
                with torch.no_grad():
                    dtype = next((p.dtype for p in module.parameters()), torch.float32)
                    args = [torch.from_numpy(np.ascontiguousarray(f)).to(dtype) for f in feeds]
                    out = module(*args)
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                raise _input_error(feeds, exc) from exc
            finally:
                module.train(was_training)
            return [t.detach().cpu().numpy() for t in _flatten(out)]
        if self.format == "onnx":
            from damo_plugins.core.onnx_utils import ort_session

            if self._session is None or self._session[0] != id(self.model):
                self._session = (id(self.model), ort_session(self.model))
            sess = self._session[1]
            names = [i.name for i in sess.get_inputs()]
            if len(feeds) != len(names):
                raise DamoError(f"the model takes {len(names)} input(s), got {len(feeds)}")
            try:
                return list(sess.run(None, dict(zip(names, feeds))))
            except Exception as exc:  # ORT's errors are not a public type hierarchy
                raise _input_error(feeds, exc) from exc
        return _manager(manager).adapter_for_format(self.format).run(self, feeds)

    # ------------------------------------------------------------- measures
    def param_count(self) -> int | None:
        if self.format == "torch":
            seen, total = set(), 0
            for p in self.model.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
            return total
        if self.format == "onnx":
            from damo_plugins.core.onnx_utils import initializer_param_count

            return initializer_param_count(self.model)
        return self.meta.get("params")

    def flops(self) -> int | None:
        """FLOPs of one forward pass at batch 1 (PyTorch models, ``torch.utils.flop_counter``;
        ONNX and backend graphs counted from the graph the same way, at their own shapes).

        The counter needs shapes only, so it runs on a copy of the model on the meta device:
        no arithmetic and no memory instead of a full forward pass (seconds for a 640-px
        detector). A model that cannot run on meta (data-dependent code) is run for real.
        """
        if self.format == "onnx":  # counted from the graph, the same way
            from damo_plugins.core.onnx_utils import graph_flops

            return graph_flops(self.model)
        if self.format != "torch" or not self.inputs:
            return self.meta.get("flops")  # backends' own formats: set by their adapter
        traced = self._shape_pass(batch=1)
        if traced is not None:
            return traced[1]
        if _on_meta(self.model):
            raise _NeedsWeights(
                "this model's FLOPs cannot be counted without its weights",
                "build it with weights (load_model(..., weights=True))",
            )
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        module = self.model
        was_training = module.training
        module.eval()
        try:
            args = [torch.from_numpy(f) for f in self.example_inputs(batch=1)]
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                module(*args)
        except Exception:
            return None
        finally:
            module.train(was_training)
        return int(counter.get_total_flops())

    def summary(self) -> dict[str, Any]:
        """Format, params, FLOPs (batch 1) and input/output specs, as reports and ``info`` show."""
        flops: int | None = None
        counted = False
        if self.format == "torch" and self.inputs and not any(o.shape for o in self.outputs):
            traced = self._shape_pass() if self.input_shape[:1] == [1] else None
            if traced is not None:  # batch 1: one meta pass gives the outputs and the FLOPs
                self._set_outputs(traced[0])
                flops, counted = traced[1], True
            else:
                self.infer_output_specs()
        return {
            "format": self.format,
            "params": self.param_count(),
            "flops": flops if counted else self.flops(),
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }

    def infer_output_specs(self) -> None:
        """Fill in output shapes and dtypes of a PyTorch model.

        From one pass on the meta device (shapes only, nothing computed); a model that cannot
        run on meta is run once for real on :meth:`example_inputs`.
        """
        traced = self._shape_pass()
        if traced is not None:
            self._set_outputs(traced[0])
            return
        if _on_meta(self.model):
            raise _NeedsWeights(
                "this model's output shapes cannot be found without its weights",
                "build it with weights (load_model(..., weights=True))",
            )
        outs = self.run(self.example_inputs())
        self._set_outputs([(list(o.shape), str(o.dtype)) for o in outs])

    def _set_outputs(self, outs: Sequence[tuple[list[int], str]]) -> None:
        names = [o.name for o in self.outputs]
        if len(names) != len(outs):
            names = [f"output{i}" for i in range(len(outs))]
        self.outputs = [TensorSpec(n, list(shape), dtype) for n, (shape, dtype) in zip(names, outs)]

    def _shape_pass(
        self, batch: int | None = None
    ) -> tuple[list[tuple[list[int], str]], int] | None:
        """(output shapes and dtypes, FLOPs) of one forward pass on the meta device, or None.

        Inputs are what :meth:`run` would feed :meth:`example_inputs` (same shapes, cast to
        the parameters' dtype), so the shapes and the count are those of a real pass:
        ``FlopCounterMode`` counts each aten op from its argument shapes, which meta tensors
        carry exactly. The model itself is not touched: a copy whose parameters and buffers
        are meta tensors runs (a model already on meta runs as it is). None when the model
        cannot run on meta — data-dependent control flow, CPU-only tensors kept outside its
        parameters and buffers — and callers then fall back to a real pass.
        """
        if self.format != "torch" or not self.inputs:
            return None
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        try:
            module = self.model if _on_meta(self.model) else _meta_copy(self.model)
            dtype = next((p.dtype for p in module.parameters()), torch.float32)
            shapes = []
            for spec in self.inputs:
                shape = spec.concrete()
                if batch is not None and shape:
                    shape[0] = batch
                shapes.append(shape)
            was_training = module.training
            module.eval()
            try:
                with torch.no_grad(), FlopCounterMode(display=False) as counter:
                    out = module(*[torch.empty(s, dtype=dtype, device="meta") for s in shapes])
                outs = _flatten(out)
            finally:
                module.train(was_training)
        except Exception:  # any failure on meta only means: run it for real
            return None
        if not all(t.is_meta for t in outs):
            return None
        specs = [(list(t.shape), str(t.dtype).removeprefix("torch.")) for t in outs]
        return specs, int(counter.get_total_flops())

    # ------------------------------------------------------------------ save
    def save(
        self, folder: str | Path, stem: str = "model", manager: PluginManager | None = None
    ) -> Path:
        """Write the model under ``folder`` (each file atomically); return the main file."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{stem}{SUFFIX[self.format]}"
        try:
            self._write(target, manager)
        except DamoError:
            raise
        except Exception as exc:  # a native writer's own wording for a full disk, mostly
            raise explain_write_failure(exc, target) from exc
        self.path = target
        return target

    def _write(self, target: Path, manager: PluginManager | None) -> None:
        if self.format == "torch":
            import torch

            payload = {
                CHECKPOINT_KEY: 1,
                "arch": self.arch,
                "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs],
                "meta": _plain(self.meta),
            }
            with atomic_path(target) as tmp:
                torch.save(payload, tmp)
        elif self.format == "onnx":
            with atomic_path(target) as tmp:
                tmp.write_bytes(self.model.SerializeToString())
        else:
            _manager(manager).adapter_for_format(self.format).save(self, target)


# ---------------------------------------------------------------------- loading
def load_model(
    spec: Any,
    *,
    manager: PluginManager | None = None,
    input_shape: Sequence[int] | None = None,
    model_args: Mapping[str, Any] | None = None,
    arch: str | None = None,
    weights: bool = True,
) -> ModelArtifact:
    """Turn what a user names into an artifact.

    ``spec`` is a registered builder name (``damo-yolo-s``), a file (``.pt``/``.pth``
    checkpoint, ``.onnx``, OpenVINO ``.xml``), a ``torch.nn.Module`` or an artifact.
    ``arch`` names the builder for a checkpoint that holds weights only (such as an official
    DAMO-YOLO ``.pth``). ``weights=False`` builds a registered builder's model on the meta
    device (see :func:`build_model`); files load as usual.
    """
    if isinstance(spec, ModelArtifact):
        return spec
    if input_shape:
        check_elements(list(input_shape), "input shape")
    mgr = _manager(manager)
    # a torch module can only exist if torch is imported: do not import it to find out
    # (an .onnx or .xml model is then loaded without paying for torch)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(spec, torch.nn.Module):
        return _torch_artifact(spec, None, input_shape, {})
    if not isinstance(spec, (str, os.PathLike)):
        inner = getattr(spec, "artifact", None)  # a pass's StepResult carries its artifact
        raise DamoError(
            f"cannot load a model from an object of type {type(spec).__name__}",
            "pass its .artifact"
            if isinstance(inner, ModelArtifact)
            else "pass a file path, a registered model name, a torch module or an artifact",
        )
    text = str(spec)
    path = Path(text)
    if not _looks_like_file(path):
        builder = mgr.get_model_builder(text)
        return build_model(
            text, builder, input_shape=input_shape, model_args=model_args, weights=weights
        )
    check_input_file(path)
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        art = _load_checkpoint(path, mgr, input_shape, model_args, arch)
    elif suffix == ".onnx":
        art = _load_onnx(path)
    elif suffix in (".xml", ".bin"):
        xml = path.with_suffix(".xml")
        check_input_file(xml)
        if xml.with_suffix(".bin").exists():
            check_input_file(xml.with_suffix(".bin"), "OpenVINO weights")
        art = mgr.adapter_for_format("openvino").load(xml)
    else:
        raise DamoError(
            f"cannot tell the format of {path}",
            "use a .pt/.pth checkpoint, an .onnx file, an OpenVINO .xml, or a model name",
        )
    art.path = path
    return art


def build_model(
    name: str,
    builder: Any,
    *,
    input_shape: Sequence[int] | None = None,
    model_args: Mapping[str, Any] | None = None,
    weights: bool = True,
) -> ModelArtifact:
    """Call a registered builder and wrap its module with its architecture record.

    ``weights=False`` builds under ``torch.device("meta")``: parameters get shapes but no
    memory and no initialization, which is all that counting parameters, FLOPs and output
    shapes needs (``damo-opt info``: building DAMO-YOLO-S for real costs more than describing
    it). Such a model cannot run or be saved; :func:`describe` falls back to real weights.
    """
    kwargs = dict(model_args or {})
    normalize = getattr(builder, "normalize_kwargs", None)
    if normalize is not None:  # e.g. a structure file -> the structure, so arch stays valid
        kwargs = normalize(kwargs)
    try:
        if weights:
            module = builder(**kwargs)
        else:
            import torch

            with torch.device("meta"):
                module = builder(**kwargs)
    except TypeError as exc:
        raise DamoError(f"model '{name}' does not accept these arguments: {exc}") from exc
    arch = {"builder": name, "kwargs": _plain(kwargs), "transforms": []}
    return _torch_artifact(
        module, arch, input_shape or getattr(builder, "default_input_shape", None), {"model": name}
    )


def _torch_artifact(
    module: Any, arch: dict | None, input_shape: Sequence[int] | None, meta: dict
) -> ModelArtifact:
    inputs = []
    names = getattr(module, "input_names", None) or ["images"]
    shape = list(input_shape) if input_shape else getattr(module, "default_input_shape", None)
    if shape:
        inputs = [TensorSpec(names[0], [int(d) for d in shape])]
    outputs = [TensorSpec(n, []) for n in getattr(module, "output_names", None) or []]
    return ModelArtifact(
        "torch", module.eval(), inputs=inputs, outputs=outputs, arch=arch, meta=dict(meta)
    )


def _load_checkpoint(
    path: Path,
    mgr: PluginManager,
    input_shape: Sequence[int] | None,
    model_args: Mapping[str, Any] | None,
    arch_name: str | None,
) -> ModelArtifact:
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch words its refusals several ways; decode the opcodes (never run them) to
        # tell a pickle that wants code from a damaged file
        from damo_plugins.core.safe_pickle import code_references

        try:
            code = code_references(path)
        except Exception:  # undecodable: damaged, reported below
            code = []
        if code:
            raise DamoError(
                f"refused to load {path}: unpickling it would run code ({', '.join(code[:3])}); "
                "checkpoints are only loaded with weights_only=True",
                "save the weights as a state_dict (or with damo-opt) and load that",
            ) from exc
        raise DamoError(
            f"{path} is not a readable PyTorch checkpoint (unpickling failed)",
            "the file may be truncated or corrupt",
        ) from exc
    except Exception as exc:  # torch.load raises many types on corrupt input
        raise DamoError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {str(exc)[:160]})",
            "the file may be truncated or corrupt",
        ) from exc
    if isinstance(payload, Mapping) and payload.get(CHECKPOINT_KEY):
        arch = payload.get("arch")
        if not arch:
            raise DamoError(
                f"{path} holds weights without an architecture record",
                "load it with --arch NAME (a registered model builder)",
            )
        state = payload.get("state_dict")
        if not isinstance(arch, Mapping) or "builder" not in arch or not isinstance(state, Mapping):
            raise DamoError(
                f"{path} is a damaged damo-plugins checkpoint (arch or weights missing)"
            )
        try:
            specs = {k: [_spec(t) for t in payload.get(k) or []] for k in ("inputs", "outputs")}
            meta = dict(payload.get("meta") or {})
            module = rebuild(arch, mgr)
        except DamoError as exc:
            raise DamoError(f"{path}: {exc.message}", exc.hint) from exc
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise DamoError(
                f"{path} is a damaged damo-plugins checkpoint ({type(exc).__name__}: "
                f"{first_line(exc)[:160]})"
            ) from exc
        _load_state(module, state, path)
        meta.setdefault("source", str(path.resolve()))  # what the model came from (reports)
        art = ModelArtifact(
            "torch",
            module.eval(),
            inputs=specs["inputs"],
            outputs=specs["outputs"],
            arch=arch,
            meta=meta,
        )
        if input_shape:
            art.inputs = [
                TensorSpec(art.inputs[0].name if art.inputs else "images", list(input_shape))
            ]
        return art
    # A plain state dict, or an official checkpoint: needs the architecture from the user.
    state = payload.get("model", payload) if isinstance(payload, Mapping) else None
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise DamoError(f"{path} holds neither a damo-plugins checkpoint nor a state_dict")
    if state and all(k.startswith("module.") for k in state):  # saved from (D)DP
        state = {k[len("module.") :]: v for k, v in state.items()}
    if arch_name is None:
        arch_name, found = _recognise(path, state, mgr)
    else:
        match = getattr(mgr.get_model_builder(arch_name), "match_state_dict", None)
        try:
            found = (match(state) if match is not None else None) or {}
        except DamoError:  # nothing the matcher can read back: the user's --model-arg decide
            found = {}
    art = build_model(
        arch_name,
        mgr.get_model_builder(arch_name),
        input_shape=input_shape,
        model_args={**found, **dict(model_args or {})},
    )
    _load_state(art.model, state, path)
    art.meta["weights_only_checkpoint"] = True
    return art


def _recognise(
    path: Path, state: Mapping[str, Any], mgr: PluginManager
) -> tuple[str, dict[str, Any]]:
    """The builder (and its kwargs) whose architecture fits a bare state dict exactly.

    Asks every registered model builder that has a ``match_state_dict(state)`` attribute
    (returning the builder's keyword arguments, or None); the core knows no architecture
    itself. A builder whose plugin fails to import is skipped: it cannot be the answer.
    """
    matches: list[tuple[str, dict[str, Any]]] = []
    asked: list[str] = []
    notes: list[str] = []
    for c in mgr.contributions("model"):
        try:
            match = getattr(c.obj, "match_state_dict", None)
        except Exception:  # a lazy builder whose module does not import
            continue
        if match is None:
            continue
        asked.append(c.name)
        try:
            found = match(state)
        except DamoError as exc:  # it knows these weights, but nothing it can build fits
            notes.append(f"{c.name}: {exc.message}")
            continue
        if found is not None:
            matches.append((c.name, dict(found)))
    if len(matches) == 1:
        return matches[0]
    tops = sorted({str(k).split(".", 1)[0] + ".*" for k in state})
    if matches:
        raise DamoError(
            f"the weights in {path} fit several architectures: "
            + ", ".join(name for name, _ in matches),
            "choose one with --arch NAME",
        )
    checked = ", ".join(asked) or "no registered builder recognises state dicts"
    if notes:  # a builder that recognised the kind of weights says what did not fit
        raise DamoError(
            f"{path} holds weights only and no architecture fits them; " + "; ".join(notes),
            "name the architecture with --arch NAME (and --model-arg for its options)",
        )
    raise DamoError(
        f"{path} holds weights only and no architecture fits them "
        f"({len(state)} tensors under {', '.join(tops[:5]) or 'nothing'}; checked: {checked} — "
        "layout, fused/training-time, classes, width and depth against keys and shapes)",
        "name the architecture with --arch NAME (and --model-arg for its options)",
    )


def _load_state(module: Any, state: Mapping[str, Any], path: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = "; ".join(lines[1:3]) if len(lines) > 1 else lines[0]
        raise DamoError(
            f"the weights in {path} do not fit the architecture: {detail[:300]}",
            "check --arch and the model arguments (e.g. num_classes)",
        ) from exc


def _spec(record: Any) -> TensorSpec:
    """A tensor spec from a checkpoint record (data from a file: checked, shape bounded)."""
    if not isinstance(record, Mapping) or not isinstance(record.get("name"), str):
        raise ValueError("a tensor record needs a 'name'")
    shape = record.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, (int, str)) for d in shape):
        raise ValueError(f"tensor '{record['name']}' has no valid 'shape'")
    check_elements(shape, f"declared tensor '{record['name']}'")
    return TensorSpec.from_dict(record)


def rebuild(arch: Mapping[str, Any], manager: PluginManager | None = None) -> Any:
    """Build the architecture an ``arch`` record describes (weights are not restored).

    A record is data from a file: it is checked for shape (a damaged one is a clear error)
    and built on the meta device first, so a record declaring a 60000x60000 layer or a
    width of 1e9 is refused by its size before any memory is allocated.
    """
    mgr = _manager(manager)
    builder_name, kwargs, transforms = _arch_parts(arch)
    builder = mgr.get_model_builder(_recorded(mgr, "model", builder_name))
    for t in transforms:
        _recorded(mgr, "pass", t["pass"])

    def build() -> Any:
        module = builder(**kwargs)
        for t in transforms:
            module = mgr.get_pass(t["pass"]).replay(module, t.get("record") or {})
        return module

    import torch

    try:
        with torch.device("meta"):
            probe = build()
    except DamoError:
        raise
    except Exception as exc:  # a builder that cannot run on meta: built for real below
        if "overflow" in str(exc):  # sizes too large even to describe
            check_elements(max_elements() + 1, "the model's weights")
        probe = None
    if probe is not None:
        check_elements(sum(t.numel() for t in probe.state_dict().values()), "the model's weights")
    try:
        return build().eval()
    except DamoError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as exc:
        raise DamoError(
            f"the architecture record ({builder_name}) cannot be built: "
            f"{type(exc).__name__}: {first_line(exc)[:200]}"
        ) from exc


def _recorded(mgr: PluginManager, kind: str, name: str) -> str:
    """``name``, checked to be installed: a checkpoint's record names what built the model.

    The name was written by the tool, not typed, so "did you mean" (right for a user's
    ``--arch``) would mislead: the likely cause is a plugin that is not installed, disabled
    or broken, and the error says which plugins that could be and how to see them.
    """
    if name in mgr.names(kind) or mgr.clash(kind, name):
        return name  # a clash is reported by the manager's own message
    what = "model builder" if kind == "model" else "step"
    role = "provides it" if kind == "model" else "provides it (the model was transformed by it)"
    why = []
    if mgr.disabled:
        why.append(f"DAMO_PLUGINS_DISABLE excludes {', '.join(sorted(mgr.disabled))}")
    if mgr.load_only is not None:
        why.append(f"DAMO_PLUGINS_LOAD loads only {', '.join(sorted(mgr.load_only))}")
    if mgr.failures:
        why.append(f"plugins that failed to load: {', '.join(sorted(mgr.failures))}")
    raise DamoError(
        f"{what} '{name}' is not installed: the checkpoint needs a plugin that {role}"
        + (f" ({'; '.join(why)})" if why else ""),
        "install the plugin that provides it; `damo-opt plugins` lists the installed ones",
    )


def _arch_parts(arch: Any) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """Builder name, keyword arguments and transforms of an ``arch`` record, checked."""
    if not isinstance(arch, Mapping) or not isinstance(arch.get("builder"), str):
        raise DamoError("damaged architecture record: 'builder' must be a model name")
    kwargs = arch.get("kwargs") or {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise DamoError("damaged architecture record: 'kwargs' must be a mapping of names")
    transforms = arch.get("transforms") or []
    if not isinstance(transforms, list) or not all(
        isinstance(t, Mapping) and isinstance(t.get("pass"), str) for t in transforms
    ):
        raise DamoError("damaged architecture record: every transform needs a 'pass' name")
    return arch["builder"], dict(kwargs), [dict(t) for t in transforms]


#: default bound on the elements of one declared tensor or of a model's weights
DEFAULT_MAX_ELEMENTS = 1 << 28


def max_elements() -> int:
    """The element bound (``DAMO_MAX_ELEMENTS`` overrides it)."""
    import os

    try:
        return max(1, int(os.environ.get("DAMO_MAX_ELEMENTS", DEFAULT_MAX_ELEMENTS)))
    except ValueError:
        return DEFAULT_MAX_ELEMENTS


def check_elements(shape_or_count: Sequence[Any] | int, what: str) -> int:
    """Refuse a declared size above :func:`max_elements` before anything is allocated.

    Shapes come from files and command lines (checkpoint records, ``--input-shape``, model
    inputs); without the bound a 15 KB file or a typo allocates tens of gigabytes.
    """
    if isinstance(shape_or_count, int):
        n = shape_or_count
    else:
        n = 1
        for d in shape_or_count:
            n *= d if isinstance(d, int) and d > 0 else 1
    limit = max_elements()
    if n > limit:
        raise DamoError(
            f"{what} {list(shape_or_count) if not isinstance(shape_or_count, int) else ''} "
            f"has {n:,} elements, above the limit of {limit:,}".replace("  ", " "),
            "set DAMO_MAX_ELEMENTS to a larger number if this is intended",
        )
    return n


def _load_onnx(path: Path) -> ModelArtifact:
    import onnx

    try:
        proto = onnx.load(str(path))
    except Exception as exc:
        raise DamoError(
            f"{path} is not a valid ONNX model ({type(exc).__name__}: {str(exc)[:160]})",
            "the file may be truncated or corrupt; export it again",
        ) from exc
    if not proto.graph.node and not proto.graph.output:
        raise DamoError(f"{path} is not a valid ONNX model (empty graph)", "export it again")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise DamoError(f"{path} fails the ONNX checker: {str(exc).splitlines()[0][:200]}") from exc
    return onnx_artifact(proto)


def onnx_artifact(proto: onnx.ModelProto, **kwargs: Any) -> ModelArtifact:
    from damo_plugins.core.onnx_utils import value_specs

    init = {i.name for i in proto.graph.initializer}
    inputs = [t for t in value_specs(proto.graph.input) if t.name not in init]
    outputs = value_specs(proto.graph.output)
    return ModelArtifact("onnx", proto, inputs=inputs, outputs=outputs, **kwargs)


# ---------------------------------------------------------------------- helpers
def _input_error(feeds: Sequence[np.ndarray], exc: BaseException) -> DamoError:
    shapes = ", ".join(f"{list(f.shape)} {f.dtype}" for f in feeds)
    first = first_line(exc)
    return DamoError(
        f"the model cannot run on input {shapes}: {first[:300]}",
        "check the input shape (--input-shape / input_shape) and dtype",
    )


def _flatten(out: Any) -> list[torch.Tensor]:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten(v)]
    raise DamoError(f"model returned {type(out).__name__}, expected tensors")


def _plain(obj: Any) -> Any:
    """JSON-like copy (what weights_only checkpoints and reports may hold)."""
    import numpy as np

    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def describe(
    spec: Any,
    *,
    manager: PluginManager | None = None,
    input_shape: Sequence[int] | None = None,
    model_args: Mapping[str, Any] | None = None,
    arch: str | None = None,
) -> dict[str, Any]:
    """:meth:`ModelArtifact.summary` of ``load_model(spec, ...)``, without building weights.

    A registered builder's model is built on the meta device and described there (no
    initialization, no arithmetic); the numbers are those of the real model because
    parameter counts, FLOPs and output shapes depend on shapes only. A model whose builder or
    forward pass does not work on meta is built for real and described as before; files
    (checkpoints, ONNX, IR) always load for real.
    """
    kwargs = {"manager": manager, "input_shape": input_shape, "model_args": model_args}
    if not isinstance(spec, (str, Path)) or _looks_like_file(Path(spec)):
        return load_model(spec, arch=arch, **kwargs).summary()
    try:
        return load_model(spec, arch=arch, weights=False, **kwargs).summary()
    except _NeedsWeights:
        pass
    except Exception as exc:
        # A builder that reads tensor values while building fails on meta in its own way
        # (or wraps that failure in a DamoError); building for real then either works or
        # raises the real error. A plain DamoError (unknown name, bad argument) is the answer.
        if isinstance(exc, DamoError) and not _wraps_other_error(exc):
            raise
    return load_model(spec, arch=arch, **kwargs).summary()


def _looks_like_file(path: Path) -> bool:
    """Whether a model spec names a file rather than a registered builder."""
    return path.suffix.lower() in (".pt", ".pth", ".onnx", ".xml", ".bin") or path.exists()


def _wraps_other_error(exc: BaseException) -> bool:
    """Whether a DamoError was raised while handling a lower-level exception."""
    inner = exc.__cause__ or exc.__context__
    return inner is not None and not isinstance(inner, DamoError)


class _NeedsWeights(DamoError):
    """A model built without weights could not be described on the meta device."""


def _on_meta(module: Any) -> bool:
    """Whether ``module`` has meta parameters or buffers (built with ``weights=False``)."""
    import torch

    return any(
        t.is_meta for t in (*module.parameters(), *module.buffers()) if isinstance(t, torch.Tensor)
    )


def _meta_copy(module: Any) -> Any:
    """A deep copy of ``module`` whose parameters and buffers are meta tensors.

    The meta tensors are put in the ``deepcopy`` memo, so the weights are never copied (a
    640-px DAMO-YOLO-M has 29 M of them) and the original module is left as it was.
    """
    import torch

    memo: dict[int, Any] = {}
    for t in (*module.parameters(), *module.buffers()):
        if id(t) in memo:
            continue
        meta = torch.empty_like(t, device="meta")
        if isinstance(t, torch.nn.Parameter):
            meta = torch.nn.Parameter(meta, requires_grad=t.requires_grad)
        memo[id(t)] = meta
    return copy.deepcopy(module, memo)


def _manager(manager: PluginManager | None) -> PluginManager:
    if manager is not None:
        return manager
    from damo_plugins.core.manager import get_manager

    return get_manager()
