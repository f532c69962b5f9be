"""What several plugin test modules build the same way: the small random detector the prune
tests cut, the trained one the project ships, a pass context, a tiny generated data set.

The helpers are plain functions (imported as ``from tests.plugins.conftest import ...``,
like ``tests.conftest.randomize_bn``); ``art`` is a fixture because each module builds it
once and shares it between its tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

#: the trained quarter-width model the demo shipped (the prune tests' Taylor and sensitivity
#: numbers are its); a checkout without it skips the tests that need it
NANO = Path(__file__).resolve().parents[2] / "damo_plugins" / "assets" / "damo-yolo-nano-synth.pt"
#: the input size of :func:`art`
ART_SIZE = 96


@pytest.fixture(scope="module")
def art() -> Any:
    """A quarter-width DAMO-YOLO-T (6 classes, 96 px) with random BatchNorm statistics, so
    that pruning and folding errors cannot hide behind identity BatchNorms."""
    from damo_plugins.core.artifact import build_model
    from damo_plugins.models.damo_yolo import build_damo_yolo_t
    from tests.conftest import randomize_bn

    a = build_model(
        "damo-yolo-t",
        build_damo_yolo_t,
        input_shape=[1, 3, ART_SIZE, ART_SIZE],
        model_args={"num_classes": 6, "width": 0.25},
    )
    randomize_bn(a.model)
    return a


def shipped_nano(size: int | None = None) -> Any:
    """The shipped trained detector (at ``size`` px when given): sensitivity, Taylor
    importance and recovery need a model that detects. Skips the test when it is absent."""
    from damo_plugins.core.artifact import load_model

    if not NANO.is_file():
        pytest.skip(f"{NANO.name} is not in this checkout")
    return load_model(NANO, input_shape=None if size is None else [1, 3, size, size])


def pass_ctx(tmp_path: Path | None, seed: int = 0) -> Any:
    """A quiet :class:`PassContext` working in ``tmp_path``, as the runner would give a pass."""
    from damo_plugins.core.manager import get_manager
    from damo_plugins.core.passes import PassContext

    return PassContext(manager=get_manager(), workdir=tmp_path, seed=seed, log=lambda s: None)


def synth_splits(folder: Path, size: int, seed: int) -> tuple[Path, Any, Any]:
    """A tiny generated data set (4 train, 2 val images) in ``folder`` and its train and
    validation splits at ``size`` px: enough for a few training steps."""
    from damo_plugins.data.synthetic import generate
    from damo_plugins.train.trainer import data_splits

    root = generate(folder, train=4, val=2, seed=seed)
    return root, *data_splits(root, size)
