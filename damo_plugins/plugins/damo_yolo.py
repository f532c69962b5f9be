"""The ``damo-yolo`` plugin: DAMO-YOLO model builders.

``damo-yolo-t``, ``damo-yolo-s`` and ``damo-yolo-m`` build the official architectures;
``damo-yolo`` builds any variant from ``backbone=`` (a structure list or a ``.json``/``.txt``
structure file) and the other options of :func:`~damo_plugins.models.damo_yolo.build_damo_yolo`.
The preset builders carry ``match_state_dict`` (:mod:`damo_plugins.models.detect`), so an
official weights-only ``.pth`` loads without ``--arch``.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from damo_plugins.core.hookspecs import hookimpl
from damo_plugins.core.lazy import lazy


def _zoo() -> ModuleType:
    from damo_plugins.models import damo_yolo

    return damo_yolo


def _detect() -> ModuleType:
    # the preset builders, with the ``match_state_dict`` attribute that recognises their
    # official (weights-only) checkpoints
    from damo_plugins.models import detect

    return detect


@hookimpl
def damo_models() -> dict[str, Callable[..., Any]]:
    # lazy: every damo-opt command collects the builders, only a build needs torch
    return {
        "damo-yolo": lazy(_zoo, "build_damo_yolo"),
        "damo-yolo-t": lazy(_detect, "build_damo_yolo_t"),
        "damo-yolo-s": lazy(_detect, "build_damo_yolo_s"),
        "damo-yolo-m": lazy(_detect, "build_damo_yolo_m"),
    }
