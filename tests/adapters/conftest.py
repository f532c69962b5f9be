"""Fixtures of the adapter tests (the seed and thread fixtures are ``tests/conftest.py``'s)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small labelled validation set in our layout (DATA/val/ + DATA/val.json): 12 images
    of the synthetic shapes the embedded model was trained on (other seed than its data)."""
    from damo_plugins.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("synth"), train=0, val=12, seed=7)


@pytest.fixture(scope="session")
def trained_checkpoint() -> Path:
    """The shipped DAMO-YOLO nano trained on the synthetic shapes (6 classes, 256 px)."""
    from tests.conftest import small_checkpoint

    return small_checkpoint()
