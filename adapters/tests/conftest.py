"""Fixtures of the adapter tests.

``tests/conftest.py`` is not loaded when only ``adapters/tests`` runs, so the one-thread rule
of the shared 2-core machine is applied here too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """Two spinning torch threads per worker slow everything down on 2 shared cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synth_val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small labelled validation set in our layout (DATA/val/ + DATA/val.json): 12 images
    of the synthetic shapes the embedded model was trained on (other seed than its data)."""
    from damo_plugins.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("synth"), train=0, val=12, seed=7)


@pytest.fixture(scope="session")
def trained_checkpoint() -> Path:
    """The shipped DAMO-YOLO nano trained on the synthetic shapes (6 classes, 256 px)."""
    from damo_plugins.demo import embedded_checkpoint

    path = embedded_checkpoint()
    assert path is not None, "damo_plugins/assets/damo-yolo-nano-synth.pt is missing"
    return path
