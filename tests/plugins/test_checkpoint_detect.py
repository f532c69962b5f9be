"""Official (upstream-trainer) checkpoints load with no flags: the architecture is recognised.

The checkpoints are written here in the upstream trainer's format — ``{'epoch', 'model':
state_dict, 'optimizer', 'feature_loss'}`` — from this project's own T/S/M models with random
weights (the key names are the official ones: the real release loads with ``strict=True``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from damo_plugins.core.artifact import load_model
from damo_plugins.core.errors import DamoError
from damo_plugins.models.damo_yolo import build_damo_yolo_m, build_damo_yolo_s, build_damo_yolo_t
from damo_plugins.models.detect import match_preset
from damo_plugins.models.tiny import build_tiny_cnn
from tests.conftest import assert_clean_error, damo_opt, randomize_bn

BUILDERS = {"t": build_damo_yolo_t, "s": build_damo_yolo_s, "m": build_damo_yolo_m}


def _upstream_checkpoint(path: Path, model: torch.nn.Module, ddp: bool = False) -> Path:
    """What DAMO-YOLO's trainer saves: the (EMA) state dict under 'model' plus training state."""
    state = model.state_dict()
    if ddp:
        state = {f"module.{k}": v for k, v in state.items()}
    torch.save(
        {
            "epoch": 12,
            "model": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]},
            "feature_loss": torch.tensor(0.5),
        },
        path,
    )
    return path


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, size: int = 64) -> None:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = a.eval()(x), b.eval()(x)
    for r, g in zip(ref, got):
        assert torch.equal(r, g)  # same weights, same graph: bit-identical


@pytest.mark.parametrize(
    ("preset", "kwargs"),
    [
        ("t", {}),
        ("s", {"num_classes": 3}),
        ("m", {"width": 0.25, "depth": 0.5}),
        ("t", {"deploy": True, "num_classes": 3, "width": 0.5}),
    ],
)
def test_upstream_checkpoint_loads_without_arch(
    tmp_path: Path, preset: str, kwargs: dict[str, Any]
) -> None:
    torch.manual_seed(0)
    src = BUILDERS[preset](**kwargs)
    randomize_bn(src)
    ckpt = _upstream_checkpoint(tmp_path / "epoch_12_ckpt.pth", src)
    art = load_model(ckpt, input_shape=[1, 3, 64, 64])
    assert art.arch == {"builder": f"damo-yolo-{preset}", "kwargs": kwargs, "transforms": []}
    _same_outputs(src, art.model)


def test_ddp_prefix_and_arch_override_fill_kwargs(tmp_path: Path) -> None:
    src = build_damo_yolo_t(num_classes=5, width=0.25)
    ckpt = _upstream_checkpoint(tmp_path / "ddp.pth", src, ddp=True)
    # --arch names the builder; the classes and width still come from the weights
    art = load_model(ckpt, arch="damo-yolo-t", input_shape=[1, 3, 64, 64])
    assert art.arch["kwargs"] == {"num_classes": 5, "width": 0.25}
    _same_outputs(src, art.model)
    # the wrong --arch is an override, and fails as one (no silent re-detection)
    with pytest.raises(DamoError, match="do not fit the architecture"):
        load_model(ckpt, arch="damo-yolo-s")


def test_info_on_upstream_checkpoint_needs_no_flags(tmp_path: Path) -> None:
    src = build_damo_yolo_t(num_classes=3, width=0.25)
    ckpt = _upstream_checkpoint(tmp_path / "official.pth", src)
    proc = damo_opt("info", str(ckpt), "--input-shape", "1,3,64,64", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["params"] == sum(p.numel() for p in src.parameters())
    shapes = {o["name"]: o["shape"] for o in info["outputs"]}
    assert shapes["scores"][-1] == 3  # classes read from the head


def test_foreign_state_dict_is_one_clear_error(tmp_path: Path) -> None:
    ckpt = tmp_path / "foreign.pth"
    torch.save({"model": build_tiny_cnn().state_dict(), "epoch": 1}, ckpt)
    with pytest.raises(DamoError) as err:
        load_model(ckpt)
    msg = str(err.value)
    for needle in ("no architecture fits", "damo-yolo-t", "damo-yolo-s", "damo-yolo-m", "--arch"):
        assert needle in msg
    assert_clean_error(damo_opt("info", str(ckpt)), "no architecture fits", "checked")


def test_matcher_rejects_near_misses() -> None:
    state = build_damo_yolo_t(width=0.25).state_dict()
    assert match_preset(state, "t") == {"width": 0.25}
    assert match_preset(state, "s") is None and match_preset(state, "m") is None
    del state["head.gfl_cls.2.bias"]  # one missing tensor: strict loading would fail
    assert match_preset(state, "t") is None
