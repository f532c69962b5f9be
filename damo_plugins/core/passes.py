"""The Pass base class.

A pass turns one :class:`~damo_plugins.core.artifact.ModelArtifact` into another and then checks
its own work: the pipeline calls :meth:`Pass.verify` with the artifacts before and after and
stops the run if it fails. The default check is output parity on a seeded random input
within ``tolerance`` (relative to the output's scale) — right for passes that must not change
what the model computes (fusion, export, conversion). Passes that change the numbers on
purpose (quantization, pruning) override ``verify`` with the metric they promise.

Configuration is a pydantic model (``Config``) that rejects unknown keys, so a misspelled
option in a recipe is an error with a location, never silently ignored. A step whose valid
options depend on something else — the ``quantize`` step's on the adapter it names — overrides
:meth:`Pass.validate_config`, which recipes call when they are validated (``--dry-run``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


class ConfigError(DamoError):
    """A problem with one option of a step, at ``loc`` (the keys below the step's options).

    Recipes prefix it with the file, line and step (``recipe.yaml:4: steps[0].quantize.preset:
    ...``); anywhere else it reads ``preset: ...``.
    """

    def __init__(self, loc: Sequence[str | int], message: str, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.loc = tuple(loc)

    def __str__(self) -> str:
        where = ".".join(str(k) for k in self.loc)
        text = f"{where}: {self.message}" if where else self.message
        return f"{text} ({self.hint})" if self.hint else text


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

    def __init__(self, config: PassConfig | Mapping[str, Any] | None = None) -> None:
        if config is None:
            config = {}
        self.config = (
            config if isinstance(config, PassConfig) else type(self).validate_config(config)
        )

    @classmethod
    def validate_config(
        cls, options: Mapping[str, Any], manager: PluginManager | None = None
    ) -> PassConfig:
        """The step's options (a recipe's mapping) as a validated ``Config``.

        Called when a recipe is loaded, so everything wrong is reported before anything runs.
        Raise pydantic's ``ValidationError`` or a :class:`ConfigError` (both located at the
        key by the recipe loader). The default is ``Config(**options)``; override it when the
        valid options depend on another option and the installed plugins (``manager``; the
        process-wide one when ``None``), e.g. on the adapter a step names.
        """
        return cls.Config(**{str(k): v for k, v in options.items()})

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
