"""The step runner: the one place a pass is applied to an artifact.

Checking the input format, running, verifying, timing and recording provenance happen here
and nowhere else; the pipeline, every verb and every benchmark script call
:func:`run_step`. A verb that does one thing builds the pass and calls the runner instead of
re-implementing the pass, so what a user gets from ``damo-opt fuse`` is exactly what a
recipe step ``reparam`` does.

Errors: a :class:`~damo_plugins.core.errors.DamoError` from a pass passes through unchanged;
any other exception becomes one that names the step (the traceback stays attached for
``--debug``). A failed verification is *returned* (``result.passed`` is false) so the caller
can record it before stopping; :meth:`StepResult.raise_if_failed` turns it into a
:class:`~damo_plugins.core.errors.VerificationError`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from damo_plugins.core.errors import DamoError, VerificationError, first_line

if TYPE_CHECKING:  # pragma: no cover
    from damo_plugins.core.artifact import ModelArtifact
    from damo_plugins.core.passes import Pass, PassContext
    from damo_plugins.core.verify import Verification


@dataclass
class StepResult:
    """What one step produced: the new artifact, its check, its cost and its metrics."""

    name: str
    artifact: ModelArtifact
    verification: Verification | None
    #: seconds spent in ``run`` (verification excluded: it is the price of trust, not of the step)
    seconds: float
    verify_seconds: float
    config: dict[str, Any]
    #: what the pass put in ``ctx.extra`` (the report's ``metrics``)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True when the step was verified and passed, or was not verified."""
        return self.verification is None or self.verification.passed

    def raise_if_failed(self, hint: str = "use --no-verify to skip checks") -> StepResult:
        if not self.passed:
            assert self.verification is not None
            raise VerificationError(
                f"step '{self.name}' failed verification: {self.verification.message}", hint
            )
        return self


def _keep_examples(before: ModelArtifact, after: ModelArtifact) -> None:
    """Carry the concrete input shape across a step that made input axes dynamic (an export
    with dynamic batch/height/width, a conversion of such a model): later verification and
    calibration then run at the size the model was built for, not with every dynamic axis
    at 1 (a detector cannot run on a 1x1 image)."""
    for i, spec in enumerate(after.inputs):
        if spec.example or all(isinstance(d, int) and d >= 0 for d in spec.shape):
            continue
        prev = next((t for t in before.inputs if t.name == spec.name), None)
        if prev is None and i < len(before.inputs):
            prev = before.inputs[i]
        if prev is not None and len(prev.shape) == len(spec.shape):
            spec.example = prev.concrete()


def run_step(pass_: Pass, artifact: ModelArtifact, ctx: PassContext) -> StepResult:
    """Apply ``pass_`` to ``artifact``: check input, run, verify (``ctx.verify``), record.

    The returned artifact's provenance gains one entry: the step's name, configuration and
    verification. ``artifact`` itself is not modified.
    """
    name = pass_.name
    pass_.check_input(artifact)
    t0 = time.perf_counter()
    try:
        after = pass_.run(artifact, ctx)
    except DamoError:
        raise
    except Exception as exc:
        raise DamoError(
            f"step '{name}' failed: {type(exc).__name__}: {first_line(exc)[:300]}",
            "run with --debug for the traceback",
        ) from exc
    seconds = time.perf_counter() - t0
    _keep_examples(artifact, after)
    t1 = time.perf_counter()
    try:
        ver = pass_.verify(artifact, after, ctx) if ctx.verify else None
    except DamoError:
        raise
    except Exception as exc:
        raise DamoError(
            f"step '{name}' could not be verified: {type(exc).__name__}: {first_line(exc)[:300]}",
            "run with --debug for the traceback, or --no-verify to skip checks",
        ) from exc
    verify_seconds = time.perf_counter() - t1
    config = pass_.config.model_dump(mode="json")
    after.provenance.append(
        {"step": name, "config": config, "verification": ver.to_dict() if ver else None}
    )
    return StepResult(name, after, ver, seconds, verify_seconds, config, dict(ctx.extra))
