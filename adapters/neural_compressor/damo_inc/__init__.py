"""damo-plugins-inc: the Intel Neural Compressor adapter (``damo_plugins`` entry point)."""

from __future__ import annotations

from damo_plugins.core.hookspecs import hookimpl


@hookimpl
def damo_adapters():
    from damo_inc.adapter import INCAdapter

    return [INCAdapter()]
