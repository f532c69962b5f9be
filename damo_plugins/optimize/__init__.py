"""Find the fastest model for a device within an accuracy budget, and compare models.

``optimize(model, data, ...)`` explores chains of the project's passes (see
:mod:`damo_plugins.optimize.engine`); ``compare(models, data, ...)`` measures models the user
already has. Heavy libraries load only when one of them runs.
"""

from __future__ import annotations

from typing import Any

__all__ = ["compare", "optimize"]


def optimize(*args: Any, **kwargs: Any) -> Any:
    """See :func:`damo_plugins.optimize.api.optimize`."""
    from damo_plugins.optimize.api import optimize as _optimize

    return _optimize(*args, **kwargs)


def compare(*args: Any, **kwargs: Any) -> Any:
    """See :func:`damo_plugins.optimize.compare.compare`."""
    from damo_plugins.optimize.compare import compare as _compare

    return _compare(*args, **kwargs)
