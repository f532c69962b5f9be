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

from damo_plugins.core.adapter import Adapter
from damo_plugins.core.artifact import ModelArtifact, TensorSpec, load_model
from damo_plugins.core.errors import DamoError, UnsupportedError, VerificationError
from damo_plugins.core.hookspecs import hookimpl
from damo_plugins.core.manager import get_manager
from damo_plugins.core.passes import Pass, PassConfig, PassContext
from damo_plugins.core.verify import Verification


def run(*args, **kwargs):
    """Run a recipe; see :func:`damo_plugins.core.pipeline.run`."""
    from damo_plugins.core.pipeline import run as _run

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
