"""Passes: one module per transformation, each registered as a plugin."""

from damo_plugins.passes.base import Pass, PassConfig, PassContext

__all__ = ["Pass", "PassConfig", "PassContext"]
