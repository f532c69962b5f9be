"""damo-plugins-openvino: the OpenVINO adapter, registered through the ``damo_plugins`` group."""

from __future__ import annotations

from damo_plugins.core.hookspecs import hookimpl


@hookimpl
def damo_adapters():
    from damo_openvino.adapter import OpenVINOAdapter

    return [OpenVINOAdapter()]
