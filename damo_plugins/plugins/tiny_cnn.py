"""The ``tiny-cnn`` plugin: a tiny classifier for smoke tests and examples."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from damo_plugins.core.hookspecs import hookimpl


@hookimpl
def damo_models() -> dict[str, Callable[..., Any]]:
    from damo_plugins.models.tiny import build_tiny_cnn

    return {"tiny-cnn": build_tiny_cnn}
