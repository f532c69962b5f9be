"""damo-plugins-nncf: the NNCF adapter, registered through the ``damo_plugins`` group."""

from __future__ import annotations

from damo_plugins.core.hookspecs import hookimpl


@hookimpl
def damo_adapters():
    from damo_nncf.adapter import NNCFAdapter

    return [NNCFAdapter()]
