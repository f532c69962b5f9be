"""Base class of hardware/backend adapters.

An adapter hands a model to one backend (OpenVINO, NNCF, Intel Neural Compressor, ONNX
Runtime). It names the backend and the devices it can target and implements what it supports
of ``convert``, ``quantize``, ``compile``, ``benchmark`` and ``run``. Whatever it does not
support raises :class:`~damo_plugins.core.errors.UnsupportedError` with a clear message instead of
failing deep inside the backend.

Adapters are created when plugins are collected, so ``__init__`` must be cheap and must not
import the backend; call :meth:`Adapter.require_backend` in the methods that need it.

Options
-------
What every backend needs for an operation is a parameter of the base method (``quantize``
takes calibration and validation data, the target format, ``keep_head_fp``, ``ignored_scope``,
``max_drop``, ``seed``, ``subset_size``, ...). What only one backend understands (NNCF's
``preset``, ONNX Runtime's ``per_channel``, OpenVINO's ``precision``) is declared by the
adapter as a pydantic schema per operation, :attr:`Adapter.options`, and taken as keyword
arguments of the same names. Two reasons:

* a recipe is checked against the chosen adapter's schema when it is *validated*, so
  ``damo-opt run --dry-run`` reports ``preset`` given to ONNX Runtime (``'preset' is an
  option of nncf; onnxruntime accepts: ...``) or a misspelling, with its file and line,
  before anything runs;
* nothing is silently dropped: adapters take no ``**kwargs`` in ``quantize``, ``compile``
  and ``benchmark`` (checked when the class is defined), so an option reaches the backend or
  is an error.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as md
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from damo_plugins.core.errors import DamoError, UnsupportedError
from damo_plugins.core.passes import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from damo_plugins.core.artifact import ModelArtifact
    from damo_plugins.core.manager import PluginManager


#: accuracy-control metric names, as reported in the quantization metrics
MAP, AGREEMENT = "mAP", "fp32-agreement"


class LabelledData(Protocol):
    """Validation data that scores model outputs itself (COCO mAP).

    :class:`damo_plugins.data.validation.LabelledDetections` is the built-in one. With such
    data, ``max_drop`` of accuracy-controlled quantization is an absolute drop of its metric;
    with plain inputs, of agreement with the FP32 model.
    """

    metric: str
    source: str

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Any: ...
    def score_outputs(
        self, outputs: Sequence[Sequence[Any]], indices: Sequence[int] | None = None
    ) -> float: ...


def is_labelled(validation: Any) -> bool:
    """True for :class:`LabelledData` (it has ``score_outputs``), without importing ``data``."""
    return callable(getattr(validation, "score_outputs", None))


#: operations whose backend-specific options an adapter declares in :attr:`Adapter.options`
OPERATIONS = ("quantize", "compile", "benchmark")


class AdapterOptions(BaseModel):
    """Base of adapter option schemas: unknown keys are errors, values are type-checked."""

    model_config = ConfigDict(extra="forbid")


def _keywords(fn: Callable[..., Any]) -> tuple[list[str], bool]:
    """Names ``fn`` accepts as keyword arguments, and whether it has a ``**kwargs``."""
    params = list(inspect.signature(fn).parameters.values())
    names = [
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
    ]
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def _refuse(offenders: Sequence[str], message: str) -> None:
    """``TypeError(message)`` naming every offender in its ``{}``, if there is any: an
    adapter class that breaks the options contract fails when it is defined."""
    if offenders:
        raise TypeError(message.format(", ".join(offenders)))


class Adapter:
    """One backend. Subclasses set the class attributes and override what they support."""

    #: name used with ``--adapter`` and in recipes
    name: ClassVar[str] = ""
    #: importable module of the backend (``openvino``, ``nncf``, ...)
    backend: ClassVar[str] = ""
    #: distribution that provides the backend, for version reports and install hints
    backend_distribution: ClassVar[str] = ""
    #: model file formats this adapter can read and write (``openvino`` for IR)
    formats: ClassVar[tuple[str, ...]] = ()
    #: what this adapter can do, for ``damo-opt devices`` and error messages
    capabilities: ClassVar[tuple[str, ...]] = ()
    #: backend-specific options per operation (``quantize``, ``compile``, ``benchmark``): a
    #: pydantic model (:class:`AdapterOptions`) whose fields the method takes as keyword
    #: arguments of the same names. An operation the adapter implements without declaring a
    #: schema takes no backend-specific options.
    options: ClassVar[Mapping[str, type[BaseModel]]] = MappingProxyType({})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Check the option schemas against the methods when the adapter class is defined.

        A mismatch is the adapter author's mistake, so it fails at import (the plugin manager
        reports the plugin as broken) rather than when a user's option is dropped or
        rejected deep inside a run.
        """
        super().__init_subclass__(**kwargs)
        where = f"{cls.__module__}.{cls.__qualname__}"
        for op in cls.options:
            if op not in OPERATIONS:
                raise TypeError(
                    f"{where}.options: unknown operation '{op}' (one of {', '.join(OPERATIONS)})"
                )
            schema = cls.options[op]
            if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
                raise TypeError(f"{where}.options['{op}'] must be a pydantic model class")
            if not cls.implements(op):
                raise TypeError(f"{where} declares {op} options but does not implement {op}")
        for op in OPERATIONS:
            if not cls.implements(op):
                continue
            names, var_kw = _keywords(getattr(cls, op))
            generic, _ = _keywords(getattr(Adapter, op))
            if var_kw:
                raise TypeError(
                    f"{where}.{op} takes **kwargs, which would drop unknown options silently: "
                    f"declare them in options['{op}'] and take them as keyword arguments"
                )
            schema = cls.options.get(op)
            fields = list(schema.model_fields) if schema is not None else []
            _refuse(
                [n for n in generic if n not in names],
                f"{where}.{op} must accept the generic parameters {{}}",
            )
            _refuse(
                [f for f in fields if f in generic],
                f"{where}.options['{op}'] redeclares the generic parameters {{}} of Adapter.{op}",
            )
            _refuse(
                [f for f in fields if f not in names],
                f"{where}.{op} does not take the declared options {{}}",
            )
            # A recipe gets the schema's default and a Python caller the method's: one value.
            params = inspect.signature(getattr(cls, op)).parameters
            for f, info in schema.model_fields.items() if schema is not None else ():
                default = params[f].default
                if info.is_required() or info.default_factory is not None:
                    continue
                if default is not inspect.Parameter.empty and default != info.default:
                    raise TypeError(
                        f"{where}.{op}: option '{f}' defaults to {default!r} in the method "
                        f"but {info.default!r} in options['{op}']"
                    )

    @classmethod
    def implements(cls, operation: str) -> bool:
        """True if this adapter overrides ``operation`` (``quantize``, ``compile``, ...)."""
        return getattr(cls, operation, None) is not getattr(Adapter, operation, None)

    @classmethod
    def option_schema(cls, operation: str) -> type[BaseModel]:
        """The schema of ``operation``'s backend-specific options (empty if none are declared).

        An operation this adapter does not implement is an :class:`UnsupportedError`.
        """
        if operation not in OPERATIONS or not cls.implements(operation):
            raise UnsupportedError(
                f"adapter '{cls.name}' does not support {operation}",
                f"it supports: {', '.join(cls.capabilities) or 'nothing'}",
            )
        return cls.options.get(operation, AdapterOptions)

    def validate_options(
        self,
        operation: str,
        values: Mapping[str, Any] | BaseModel | None = None,
        *,
        others: Iterable[Adapter] = (),
        also: Iterable[str] = (),
    ) -> BaseModel:
        """``values`` checked against this adapter's schema for ``operation``, defaults filled.

        Raises :class:`~damo_plugins.core.passes.ConfigError` located at the offending key.
        An option another adapter (``others``) declares for the same operation is named as
        that adapter's; any other unknown key gets a did-you-mean among this adapter's
        options and ``also`` (the names the calling step itself takes).
        """
        schema = self.option_schema(operation)
        if isinstance(values, schema):
            return values
        if isinstance(values, BaseModel):
            values = values.model_dump()
        data = {str(k): v for k, v in (values or {}).items()}
        fields = list(schema.model_fields)
        for key in data:
            if key in fields:
                continue
            owners = [
                a.name
                for a in others
                if a.name != self.name
                and a.implements(operation)
                and key in a.option_schema(operation).model_fields
            ]
            accepts = (
                f"{self.name} accepts: {', '.join(fields)}"
                if fields
                else f"{self.name} takes no {operation} options"
            )
            if owners:
                raise ConfigError((key,), f"'{key}' is an option of {', '.join(owners)}; {accepts}")
            close = difflib.get_close_matches(key, [*fields, *also], n=1, cutoff=0.6)
            guess = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError((key,), f"unknown option '{key}'{guess}; {accepts}")
        try:
            return schema(**data)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = tuple(err.get("loc", ()))
            raise ConfigError(loc, err.get("msg", "invalid value")) from None

    def backend_version(self) -> str | None:
        """Installed version of the backend distribution, or ``None`` if it is missing."""
        try:
            return md.version(self.backend_distribution)
        except md.PackageNotFoundError:
            return None

    def require_backend(self) -> ModuleType:
        """Import the backend or raise a clear error saying how to install it."""
        try:
            return importlib.import_module(self.backend)
        except ImportError as exc:
            raise UnsupportedError(
                f"adapter '{self.name}' needs {self.backend_distribution}, which cannot be "
                f"imported ({exc})",
                f"pip install {self.backend_distribution}",
            ) from exc

    def devices(self) -> list[str]:
        """Devices this adapter can target on this machine."""
        return ["CPU"]

    def check_device(self, device: str) -> str:
        available = self.devices()
        if device not in available and device.split(".")[0] not in ("AUTO", "MULTI", "HETERO"):
            raise UnsupportedError(
                f"device '{device}' is not available to adapter '{self.name}'",
                f"available here: {', '.join(available) or 'none'}",
            )
        return device

    def _unsupported(self, what: str) -> UnsupportedError:
        can = ", ".join(self.capabilities) or "nothing"
        return UnsupportedError(
            f"adapter '{self.name}' does not support {what}", f"it supports: {can}"
        )

    def _benchmark_header(self, device: str, hint: str, compile_ms: float) -> dict[str, Any]:
        """The keys that open every adapter's :meth:`benchmark` result, so that reports and
        ``compare`` read the same names whichever backend measured."""
        return {
            "adapter": self.name,
            "backend_version": self.backend_version(),
            "device": device,
            "hint": hint,
            "compile_ms": compile_ms,
        }

    # ------------------------------------------------------------ operations
    # The parameters below are the generic ones every implementation takes; backend-specific
    # options follow them as keyword arguments declared in ``options[operation]``.
    def convert(self, artifact: ModelArtifact, **config: Any) -> ModelArtifact:
        """Convert to this adapter's own format."""
        raise self._unsupported("convert")

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
        validation_fn: Callable[..., float] | None = None,
        seed: int = 0,
    ) -> ModelArtifact:
        """Quantize (usually to INT8) with the given calibration data.

        ``target``: output format (``openvino``/``onnx``; ``None``: the adapter's default);
        ``mode``: ``int8`` (weights and activations) or ``weights`` (weight-only);
        ``subset_size``: calibration samples to use; ``keep_head_fp``: keep the detector
        decode in floating point; ``ignored_scope``: ``{names, types, patterns}`` kept in
        floating point; ``max_drop`` with ``validation`` (:class:`LabelledData`: absolute
        mAP drop; plain inputs: agreement with FP32) or the caller's ``validation_fn``:
        accuracy control; ``seed``: for quantizers that draw random numbers (the built-in
        ones are deterministic given their data). An adapter that cannot honour one of these
        raises :class:`UnsupportedError` instead of ignoring it.
        """
        raise self._unsupported("quantize")

    def compile(self, artifact: ModelArtifact, device: str = "CPU") -> Any:
        """A backend object that runs ``artifact`` on ``device`` (compiled model, session)."""
        raise self._unsupported("compile")

    def benchmark(
        self,
        artifact: ModelArtifact,
        device: str = "CPU",
        *,
        iterations: int | None = None,
        seconds: float | None = None,
        warmup: int = 3,
    ) -> dict:
        """Latency/throughput statistics (:mod:`damo_plugins.lib.timing`'s keys).

        ``iterations`` measured runs, or ``seconds`` of measuring (5 s when neither is
        given), after ``warmup`` discarded runs.
        """
        raise self._unsupported("benchmark")

    def run(
        self, artifact: ModelArtifact, feeds: Sequence[np.ndarray], device: str = "CPU"
    ) -> list[np.ndarray]:
        """Run one inference; used to verify conversions against the source model."""
        raise self._unsupported("run")

    # ---------------------------------------------------------- file formats
    def load(self, path: Path) -> ModelArtifact:
        raise self._unsupported(f"reading {path.suffix} files")

    def save(self, artifact: ModelArtifact, path: Path) -> Path:
        """Write ``artifact`` at ``path`` (the caller makes it atomic); return the main file."""
        raise self._unsupported("saving models")

    def describe(self) -> dict[str, Any]:
        """What ``damo-opt devices`` prints for this adapter."""
        version = self.backend_version()
        try:
            devices = self.devices() if version else []
        except DamoError as exc:
            devices = [f"error: {exc}"]
        return {
            "adapter": self.name,
            "backend": self.backend_distribution,
            "version": version,
            "devices": devices,
            "capabilities": list(self.capabilities),
        }


def adapter_options(
    manager: PluginManager | None,
    adapter: str,
    operation: str,
    values: Mapping[str, Any],
    *,
    also: Iterable[str] = (),
) -> tuple[Adapter, BaseModel]:
    """The adapter named ``adapter`` and ``values`` validated against its ``operation`` schema.

    For steps run by an adapter (``quantize``, ``benchmark``): the recipe stays flat (``{adapter:
    nncf, preset: mixed}``) and the step hands the keys it does not know itself here. Every
    problem is a :class:`~damo_plugins.core.passes.ConfigError` located at its key, ``adapter``
    included (unknown, clashing or not doing ``operation``).
    """
    from damo_plugins.core.manager import get_manager

    mgr = manager or get_manager()
    try:
        found = mgr.get_adapter(adapter)
        found.option_schema(operation)
    except DamoError as exc:
        raise ConfigError(("adapter",), exc.message, exc.hint) from None
    others = [c.obj for c in mgr.contributions("adapter")]
    return found, found.validate_options(operation, values, others=others, also=also)
