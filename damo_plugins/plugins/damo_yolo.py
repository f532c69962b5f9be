"""The ``damo-yolo`` plugin: DAMO-YOLO model builders.

``damo-yolo-t``, ``damo-yolo-s`` and ``damo-yolo-m`` build the official architectures;
``damo-yolo`` builds any variant from ``backbone=`` (a structure list or a ``.json``/``.txt``
structure file) and the other options of :func:`~damo_plugins.models.damo_yolo.build_damo_yolo`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from damo_plugins.core.hookspecs import hookimpl


@hookimpl
def damo_models() -> dict[str, Callable[..., Any]]:
    from damo_plugins.models.damo_yolo import (
        build_damo_yolo,
        build_damo_yolo_m,
        build_damo_yolo_s,
        build_damo_yolo_t,
    )

    return {
        "damo-yolo": build_damo_yolo,
        "damo-yolo-t": build_damo_yolo_t,
        "damo-yolo-s": build_damo_yolo_s,
        "damo-yolo-m": build_damo_yolo_m,
    }
