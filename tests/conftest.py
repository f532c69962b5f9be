"""Shared fixtures.

Fake third-party plugins are real distributions on disk, written and installed by
:mod:`damo_plugins.testing` (the helper plugin authors use too): a module plus a
``.dist-info`` folder with ``METADATA`` and ``entry_points.txt``, put on ``sys.path`` and
``PYTHONPATH``. ``importlib.metadata`` finds them exactly as it finds pip-installed ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from damo_plugins.testing import assert_clean_error, installed, run_cli

REPO = Path(__file__).resolve().parents[1]

#: ``damo_opt("info", "tiny-cnn")``: the installed ``damo-opt`` in a subprocess (what a user runs)
damo_opt = run_cli

__all__ = ["REPO", "assert_clean_error", "damo_opt", "randomize_bn", "small_checkpoint"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with ``slow`` tests first, each module's tests kept together and in order.

    ``pytest -n 2`` hands each worker runs of consecutive tests: started early, the
    minutes-long end-to-end tests overlap the many short ones instead of ending the run with
    one worker idle; kept together, a module's fixtures are built on one worker, once.
    """
    slow: dict[str, int] = {}
    for item in items:
        slow.setdefault(item.nodeid.split("::")[0], 0)
        if item.get_closest_marker("slow") is not None:
            slow[item.nodeid.split("::")[0]] += 1
    order = {m: i for i, m in enumerate(slow)}
    items.sort(
        key=lambda it: (slow[it.nodeid.split("::")[0]] == 0, order[it.nodeid.split("::")[0]])
    )


@pytest.fixture
def plugin_path(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Factory: ``plugin_path(dist, {module: source}, {ep_name: module})`` -> installed folder.

    Each call installs one more distribution under ``tmp_path`` for the rest of the test
    (this process and ``damo_opt`` subprocesses); all are uninstalled when the test ends.
    """
    with contextlib.ExitStack() as stack:

        def make(dist: str, modules: dict[str, str], entry_points: dict[str, str]) -> Path:
            return stack.enter_context(installed(dist, modules, entry_points, root=tmp_path / dist))

        yield make


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same random state: a failure reproduces, nothing flickers."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread per test process: two workers on two shared cores, and two
    spinning torch threads made small training steps ~20x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomize_bn(model: Any, seed: int = 0) -> Any:
    """Non-trivial BN statistics and affine terms, so folding errors cannot hide."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


#: a pass that writes a partial file and then sleeps (installed by the ``sleepy`` fixture)
SLOW_PASS = """
import time
from damo_plugins import Pass, hookimpl

class Sleepy(Pass):
    name = "sleepy"
    accepts = ("onnx",)

    def run(self, artifact, ctx):
        (ctx.workdir / "model.onnx").write_bytes(b"partial")
        print("SLEEPY-STARTED", flush=True)
        time.sleep(120)
        return artifact

@hookimpl
def damo_passes():
    return [Sleepy]
"""


@pytest.fixture
def sleepy(plugin_path, tmp_path: Path) -> Path:
    """A recipe ``export -> sleepy -> convert`` whose middle step writes a partial file,
    prints ``SLEEPY-STARTED`` and sleeps: for killing, signalling and racing real runs."""
    plugin_path("sleepy-dist", {"sleepy_plugin": SLOW_PASS}, {"sleepy": "sleepy_plugin"})
    recipe = tmp_path / "slow.yaml"
    recipe.write_text("model: tiny-cnn\nsteps: [export, sleepy, convert]\n")
    return recipe


def small_checkpoint() -> Path:
    """The small shipped model (DAMO-YOLO-T quarter width, 0.6 M params, 6 classes, 256 px)
    that most tests use: a quarter of the demo's model's compute, so the suite stays quick."""
    from damo_plugins.demo import embedded_checkpoint

    path = embedded_checkpoint("damo-yolo-nano-synth.pt")
    assert path is not None, "damo_plugins/assets/damo-yolo-nano-synth.pt is missing"
    return path
