"""damo-plugins: compress and deploy DAMO-YOLO-family detectors through pluggy plugins.

What third-party code imports is this module's ``__all__`` and nothing else: everything
named here is stable, everything reached through ``damo_plugins.core.*`` or deeper may move.
``docs/plugins.md`` ("The public API") describes each name in one line, and
``tests/core/test_public_api.py`` keeps that table and ``__all__`` identical.

* write a plugin: :data:`hookimpl`, :class:`Pass`, :class:`PassConfig`, :class:`PassContext`,
  :class:`Adapter`, :class:`Verification`, :func:`parity`;
* handle models: :class:`ModelArtifact`, :class:`TensorSpec`, :func:`load_model`;
* run things: :func:`run` (a recipe), :func:`run_step` and :class:`StepResult` (one pass),
  :func:`get_manager` and :class:`PluginManager` (the loaded plugins);
* report problems: :class:`DamoError`, :class:`UnsupportedError`, :class:`VerificationError`.

Importing this module imports re-exports of ``damo_plugins.core`` only, and none of torch,
ONNX or the backends: a plugin that imports it at module level stays cheap to load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from damo_plugins.core.adapter import Adapter
from damo_plugins.core.artifact import ModelArtifact, TensorSpec, load_model
from damo_plugins.core.errors import DamoError, UnsupportedError, VerificationError
from damo_plugins.core.hookspecs import hookimpl
from damo_plugins.core.manager import PluginManager, get_manager
from damo_plugins.core.passes import Pass, PassConfig, PassContext
from damo_plugins.core.runner import StepResult, run_step
from damo_plugins.core.verify import Verification, parity

if TYPE_CHECKING:  # pragma: no cover
    from damo_plugins.core.pipeline import RunResult


def run(*args: Any, **kwargs: Any) -> RunResult:
    """Run a recipe; see :func:`damo_plugins.core.pipeline.run` for the arguments.

    A wrapper rather than a re-export because the pipeline imports ``__version__`` from this
    module: importing it here at the top would be circular.
    """
    from damo_plugins.core.pipeline import run as _run

    return _run(*args, **kwargs)


__all__ = [
    "Adapter",
    "DamoError",
    "ModelArtifact",
    "Pass",
    "PassConfig",
    "PassContext",
    "PluginManager",
    "StepResult",
    "TensorSpec",
    "UnsupportedError",
    "Verification",
    "VerificationError",
    "__version__",
    "get_manager",
    "hookimpl",
    "load_model",
    "parity",
    "run",
    "run_step",
]
