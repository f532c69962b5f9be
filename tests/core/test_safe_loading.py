"""Checkpoints never run code: every way of pickling a call is refused as "would run code"."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from damo_plugins.core.artifact import load_model
from damo_plugins.core.errors import DamoError
from damo_plugins.core.safe_pickle import code_references


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_raw_pickles_calling_code_are_refused_by_name(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / f"evil{protocol}.pt"
    path.write_bytes(pickle.dumps({"model": _Evil()}, protocol=protocol))
    assert code_references(path) == ["posix.system"]
    with pytest.raises(DamoError, match=r"would run code \(posix.system\)"):
        load_model(path)


def test_torch_zip_checkpoint_calling_code_is_refused(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "evil.pth"
    torch.save({"model": _Evil()}, path)
    with pytest.raises(DamoError, match=r"would run code \(posix.system\)"):
        load_model(path)


def test_plain_tensors_reference_no_code_and_damage_is_called_damage(tmp_path: Path) -> None:
    import torch

    ok = tmp_path / "ok.pt"
    torch.save({"w": torch.zeros(3)}, ok)
    assert code_references(ok) == []
    cut = tmp_path / "cut.pt"
    raw = pickle.dumps({"w": [1, 2, 3]}, protocol=2)
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DamoError, match="truncated or corrupt"):
        load_model(cut)
