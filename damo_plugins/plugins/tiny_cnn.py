"""The ``tiny-cnn`` plugin: a tiny classifier for smoke tests and examples."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from damo_plugins.core.hookspecs import hookimpl
from damo_plugins.core.lazy import lazy


def _tiny() -> ModuleType:
    from damo_plugins.models import tiny

    return tiny


@hookimpl
def damo_models() -> dict[str, Callable[..., Any]]:
    # lazy: models.tiny imports torch, which only building the model needs
    return {"tiny-cnn": lazy(_tiny, "build_tiny_cnn")}
