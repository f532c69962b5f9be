"""The ``calibration`` plugin: the built-in calibration data sources (:mod:`damo_plugins.data.calibration`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from damo_plugins.core.hookspecs import hookimpl


@hookimpl
def damo_calibration_sources() -> dict[str, Callable[..., Any]]:
    from damo_plugins.data.calibration import (
        generated_images,
        read_images,
        read_numpy,
        synthetic_images,
    )

    return {
        "images": read_images,
        "numpy": read_numpy,
        "generated": generated_images,
        "synthetic": synthetic_images,
    }
