"""Base class of hardware/backend adapters.

An adapter hands a model to one backend (OpenVINO, NNCF, Intel Neural Compressor, ONNX
Runtime). It names the backend and the devices it can target and implements what it supports
of ``convert``, ``quantize``, ``compile``, ``benchmark`` and ``run``. Whatever it does not
support raises :class:`~damo_plugins.core.errors.UnsupportedError` with a clear message instead of
failing deep inside the backend.

Adapters are created when plugins are collected, so ``__init__`` must be cheap and must not
import the backend; call :meth:`Adapter.require_backend` in the methods that need it.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from damo_plugins.core.errors import DamoError, UnsupportedError

if TYPE_CHECKING:  # pragma: no cover
    from damo_plugins.core.artifact import ModelArtifact


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
    def score_outputs(self, outputs: Sequence[Sequence[Any]], indices: Sequence[int] | None = None) -> float: ...


def is_labelled(validation: Any) -> bool:
    """True for :class:`LabelledData` (it has ``score_outputs``), without importing ``data``."""
    return callable(getattr(validation, "score_outputs", None))


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

    # ------------------------------------------------------------ operations
    def convert(self, artifact: ModelArtifact, **config: Any) -> ModelArtifact:
        """Convert to this adapter's own format."""
        raise self._unsupported("convert")

    def quantize(
        self, artifact: ModelArtifact, calibration: Iterable[Any], **config: Any
    ) -> ModelArtifact:
        """Quantize (usually to INT8) with the given calibration data."""
        raise self._unsupported("quantize")

    def compile(self, artifact: ModelArtifact, device: str = "CPU", **config: Any) -> Any:
        raise self._unsupported("compile")

    def benchmark(self, artifact: ModelArtifact, device: str = "CPU", **config: Any) -> dict:
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
