"""The core plugin: ``export``, ``convert``, ``evaluate`` and a smoke-test model.

Registered through the ``damo_plugins`` entry-point group in ``setup.cfg`` like any
third-party plugin.
"""

from __future__ import annotations

from damo_plugins.hookspecs import hookimpl


@hookimpl
def damo_passes():
    from damo_plugins.passes.convert import ConvertPass
    from damo_plugins.passes.evaluate import EvaluatePass
    from damo_plugins.passes.export import ExportPass

    return [ExportPass, ConvertPass, EvaluatePass]


@hookimpl
def damo_models():
    from damo_plugins.models.tiny import build_tiny_cnn

    return {"tiny-cnn": build_tiny_cnn}
