"""Shared fixtures.

Fake third-party plugins are real distributions on disk: a module plus a ``.dist-info``
folder with ``METADATA`` and ``entry_points.txt``, put on ``sys.path`` (or ``PYTHONPATH`` for
subprocesses). ``importlib.metadata`` finds them exactly as it finds pip-installed ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

def write_dist(
    root: Path, dist: str, modules: dict[str, str], entry_points: dict[str, str]
) -> Path:
    """Create a minimal installed distribution under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for mod, source in modules.items():
        (root / f"{mod}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n")
    eps = "[damo_plugins]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(eps)
    return root


@pytest.fixture
def plugin_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """Factory: ``plugin_path(dist, {module: source}, {ep_name: module})`` -> on sys.path."""

    def make(dist: str, modules: dict[str, str], entry_points: dict[str, str]) -> Path:
        root = write_dist(tmp_path / dist, dist, modules, entry_points)
        monkeypatch.syspath_prepend(str(root))
        existing = os.environ.get("PYTHONPATH", "")
        monkeypatch.setenv("PYTHONPATH", str(root) + (os.pathsep + existing if existing else ""))
        return root

    return make


def damo_opt(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``damo-opt`` in a subprocess (what a user runs)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "damo_plugins.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


def assert_clean_error(
    proc: subprocess.CompletedProcess[str], *needles: str, code: int = 2
) -> None:
    """One clear line on stderr, the documented exit status, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("damo-opt: error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle.lower() in errors[0].lower(), (needle, errors[0])


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
