"""An example third-party plugin: contributes the ``hello`` pass.

``hello`` wraps a PyTorch model so its outputs are multiplied by ``scale``. With the default
``scale: 1.0`` the model computes the same thing and the default verification (output
parity) passes; any other scale changes the outputs, so this pass declares what it promises
in its own ``verify``.
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field

from damo_plugins import ModelArtifact, Pass, PassConfig, PassContext, Verification, hookimpl
from damo_plugins.core.verify import parity


class HelloConfig(PassConfig):
    scale: float = Field(1.0, description="factor applied to every output")


class _Scaled(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, scale: float) -> None:
        super().__init__()
        self.inner = inner
        self.scale = scale

    def forward(self, *args):
        out = self.inner(*args)
        if isinstance(out, torch.Tensor):
            return out * self.scale
        return tuple(o * self.scale for o in out)


class HelloPass(Pass):
    name = "hello"
    accepts = ("torch",)
    Config = HelloConfig
    description = "example: multiply a model's outputs by a constant"

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        model = _Scaled(copy.deepcopy(artifact.model), self.config.scale)
        ctx.extra["scale"] = self.config.scale
        out = artifact.derive(model=model)
        out.arch = None  # a wrapped model is no longer what the builder makes
        return out

    def verify(self, before: ModelArtifact, after: ModelArtifact, ctx: PassContext) -> Verification:
        feeds = before.example_inputs(seed=ctx.seed)
        expected = [o * self.config.scale for o in before.run(feeds)]
        return parity(expected, after.run(feeds), 1e-6)


@hookimpl
def damo_passes():
    return [HelloPass]
