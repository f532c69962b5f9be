"""The Pass base class.

A pass turns one :class:`~damo_plugins.core.artifact.ModelArtifact` into another and then checks
its own work: the pipeline calls :meth:`Pass.verify` with the artifacts before and after and
stops the run if it fails. The default check is output parity on a seeded random input
within ``tolerance`` (relative to the output's scale) — right for passes that must not change
what the model computes (fusion, export, conversion). Passes that change the numbers on
purpose (quantization, pruning) override ``verify`` with the metric they promise.

Configuration is a pydantic model (``Config``) that rejects unknown keys, so a misspelled
option in a recipe is an error with a location, never silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from damo_plugins.core.errors import DamoError, UnsupportedError
from damo_plugins.core.verify import Verification, parity

if TYPE_CHECKING:  # pragma: no cover
    from damo_plugins.core.artifact import ModelArtifact
    from damo_plugins.core.manager import PluginManager


class PassConfig(BaseModel):
    """Base of pass configurations: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class PassContext:
    """What a pass may use besides its artifact."""

    manager: PluginManager
    workdir: Path
    seed: int = 0
    verify: bool = True
    log: Any = print
    extra: dict[str, Any] = field(default_factory=dict)


class Pass:
    """A model transformation. Subclasses set ``name`` and override ``run``."""

    name: ClassVar[str] = ""
    #: artifact formats ``run`` accepts
    accepts: ClassVar[tuple[str, ...]] = ("torch",)
    #: format ``run`` returns; ``None`` means the same as its input
    produces: ClassVar[str | None] = None
    #: pydantic model of the options
    Config: ClassVar[type[PassConfig]] = PassConfig
    #: default verification tolerance (max error relative to output scale)
    tolerance: ClassVar[float] = 1e-4
    description: ClassVar[str] = ""
    #: a measurement (benchmark, evaluation): the pipeline keeps the input's files instead of
    #: saving an identical copy, and writes only the step's metrics
    measures_only: ClassVar[bool] = False

    def __init__(self, config: PassConfig | dict[str, Any] | None = None) -> None:
        if config is None:
            config = {}
        self.config = config if isinstance(config, PassConfig) else self.Config(**config)

    @classmethod
    def output_format(cls, config: PassConfig, input_format: str) -> str:
        """Format this pass will produce for ``input_format`` (used to check recipes)."""
        return cls.produces or input_format

    def check_input(self, artifact: ModelArtifact) -> None:
        if artifact.format not in self.accepts:
            raise UnsupportedError(
                f"step '{self.name}' cannot take a {artifact.format} model",
                f"it accepts: {', '.join(self.accepts)}; reorder the steps or add a conversion",
            )

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        raise NotImplementedError

    def verify(self, before: ModelArtifact, after: ModelArtifact, ctx: PassContext) -> Verification:
        """Default: outputs on a seeded random input agree within ``tolerance``."""
        tol = getattr(self.config, "tolerance", None) or self.tolerance
        feeds = before.example_inputs(seed=ctx.seed)
        if not feeds:
            raise DamoError(
                f"cannot verify step '{self.name}': the model's input shape is unknown",
                "give input_shape in the recipe (or --input-shape), or run with --no-verify",
            )
        ref = before.run(feeds, ctx.manager)
        out = after.run(feeds, ctx.manager)
        return parity(ref, out, tol)

    @classmethod
    def replay(cls, module: Any, record: dict[str, Any]) -> Any:
        """Re-apply this pass's *structural* change to a freshly built module.

        Used to rebuild a saved PyTorch model from a safe checkpoint; ``record`` is what the
        pass stored in ``artifact.arch["transforms"]``. Passes that change only weights need
        not implement it.
        """
        raise DamoError(f"pass '{cls.name}' cannot rebuild a saved model")
