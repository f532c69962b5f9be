"""damo-plugins: compress and deploy DAMO-YOLO-family detectors through pluggy plugins.

The public API is small:

* :data:`hookimpl` — mark a plugin's hook implementations;
* :class:`Pass`, :class:`PassConfig`, :class:`PassContext` — write a pass;
* :class:`Adapter` — write a backend adapter;
* :class:`ModelArtifact`, :func:`load_model` — models in any format;
* :func:`run` — run a recipe; :func:`get_manager` — the loaded plugins;
* :class:`DamoError` — errors meant for the user.
"""

from __future__ import annotations

__version__ = "0.1.0"

from damo_plugins.adapter import Adapter
from damo_plugins.artifact import ModelArtifact, TensorSpec, load_model
from damo_plugins.errors import DamoError, UnsupportedError, VerificationError
from damo_plugins.hookspecs import hookimpl
from damo_plugins.manager import get_manager
from damo_plugins.passes.base import Pass, PassConfig, PassContext
from damo_plugins.verify import Verification


def run(*args, **kwargs):
    """Run a recipe; see :func:`damo_plugins.pipeline.run`."""
    from damo_plugins.pipeline import run as _run

    return _run(*args, **kwargs)


__all__ = [
    "Adapter",
    "DamoError",
    "ModelArtifact",
    "Pass",
    "PassConfig",
    "PassContext",
    "TensorSpec",
    "UnsupportedError",
    "Verification",
    "VerificationError",
    "__version__",
    "get_manager",
    "hookimpl",
    "load_model",
    "run",
]
