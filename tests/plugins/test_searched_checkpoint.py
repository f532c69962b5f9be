"""Searched (MAE-NAS) backbones in an official-format ``.pth``, recognised with no ``--arch``.

Each checkpoint is written as the upstream trainer writes one (``{'epoch', 'model',
'optimizer', 'feature_loss'}``, random weights with non-trivial BN statistics); loading it
must rebuild the architecture from the keys and shapes alone (the generic ``damo-yolo``
builder with the backbone structure read back) and compute exactly what the model it came
from computes: same weights, same ops, so the outputs are compared at 1e-6 absolute (scores
in [0, 1], boxes in pixels below 200; measured: 0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from damo_plugins.core.artifact import load_model
from damo_plugins.core.errors import DamoError
from damo_plugins.models.damo_yolo import ASSETS, build_damo_yolo, build_damo_yolo_t
from damo_plugins.models.detect import match_searched
from tests.conftest import assert_clean_error, damo_opt, randomize_bn

#: a ``res`` structure no preset has: 5x5 kernels, a stride-1 stage with equal in/out
#: channels (its stride cannot be read from a projection: both patterns are tried)
RES = [
    {"class": "ConvKXBNRELU", "in": 3, "out": 16, "s": 1, "k": 3},
    {"class": "SuperResConvK1KX", "in": 16, "out": 32, "s": 2, "k": 5, "L": 1, "btn": 16},
    {"class": "SuperResConvK1KX", "in": 32, "out": 48, "s": 2, "k": 3, "L": 2, "btn": 24},
    {"class": "SuperResConvK1KX", "in": 48, "out": 64, "s": 2, "k": 3, "L": 3, "btn": 32},
    {"class": "SuperResConvK1KX", "in": 64, "out": 64, "s": 1, "k": 5, "L": 1, "btn": 40},
    {"class": "SuperResConvK1KX", "in": 64, "out": 96, "s": 2, "k": 3, "L": 2, "btn": 48},
]
#: a ``csp`` structure: a stride-2 stage of depth 1 (only its downsampler), a stride-1 stage
#: that joins the wrapper before it with other channels, KXKX blocks with 5x5 kernels
CSP = [
    {"class": "ConvKXBNRELU", "in": 3, "out": 16, "s": 1, "k": 3},
    {"class": "SuperResConvKXKX", "in": 16, "out": 32, "s": 2, "k": 3, "L": 2, "btn": 16},
    {"class": "SuperResConvKXKX", "in": 32, "out": 48, "s": 2, "k": 5, "L": 1, "btn": 24},
    {"class": "SuperResConvKXKX", "in": 48, "out": 64, "s": 2, "k": 3, "L": 3, "btn": 32},
    {"class": "SuperResConvKXKX", "in": 64, "out": 80, "s": 1, "k": 5, "L": 2, "btn": 40},
    {"class": "SuperResConvKXKX", "in": 80, "out": 96, "s": 2, "k": 3, "L": 2, "btn": 48},
]

CASES: dict[str, dict[str, Any]] = {
    "res-searched": {"backbone": RES, "num_classes": 3, "neck_hidden_ratio": 0.75},
    "csp-searched": {"backbone": CSP, "num_classes": 4, "neck_depth": 1.5},
    "res-fused": {"backbone": RES, "num_classes": 2, "deploy": True},
    "res-identity": {"backbone": RES, "num_classes": 3, "rep_identity": True},
    # the shipped structures, scaled and with the generic neck: no preset fits these
    "L20-generic-neck": {"backbone": str(ASSETS / "tinynas_L20_k1kx.json"), "width": 0.25},
    "L25-generic-neck": {"backbone": str(ASSETS / "tinynas_L25_k1kx.json"), "width": 0.25},
    "L35-generic-neck": {
        "backbone": str(ASSETS / "tinynas_L35_kxkx.json"),
        "width": 0.25,
        "depth": 0.5,
        "neck_out_channels": [32, 48, 64],
    },
}


def _official(tmp_path: Path, model: torch.nn.Module, prefix: str = "") -> Path:
    """The upstream trainer's format: EMA weights under 'model', beside optimizer state."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    state = {prefix + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "searched.pth"
    torch.save(
        {"epoch": 299, "model": state, "optimizer": optimizer.state_dict(), "feature_loss": 0.5},
        path,
    )
    return path


def _model(kwargs: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    kwargs = dict(kwargs)
    model = build_damo_yolo(kwargs.pop("backbone"), **kwargs)
    with torch.no_grad():  # class biases spread, so scores differ between anchors
        for conv in model.head.gfl_cls:
            conv.bias.normal_(0.0, 1.0)
    return randomize_bn(model, seed).eval()


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.from_numpy(np.random.default_rng(1).random(shape, dtype=np.float32))
    with torch.no_grad():
        for ra, rb in zip(a(x), b(x)):
            assert ra.shape == rb.shape
            torch.testing.assert_close(rb, ra, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_searched_checkpoint_loads_without_arch(tmp_path: Path, case: str) -> None:
    model = _model(CASES[case])
    ckpt = _official(tmp_path, model, prefix="module." if case == "res-fused" else "")
    art = load_model(ckpt, input_shape=[1, 3, 96, 128])  # no arch, no model args
    assert art.arch is not None and art.arch["builder"] == "damo-yolo"
    assert art.meta.get("weights_only_checkpoint") is True
    _same_outputs(model, art.model, (2, 3, 96, 128))
    # the record is the structure itself: the recognised model saves and reloads as is
    saved = art.save(tmp_path / "saved")
    _same_outputs(model, load_model(saved).model, (1, 3, 64, 64))


def test_presets_stay_presets() -> None:
    """T/S/M weights are the presets' (one answer, not two): the searched matcher defers."""
    model = build_damo_yolo_t(num_classes=3, width=0.25)
    assert match_searched(model.state_dict()) is None


def test_weights_no_structure_fits_name_what_was_checked(tmp_path: Path) -> None:
    model = _model(CASES["res-searched"])
    state = dict(model.state_dict())
    # a neck stage that no RepGFPN builds: one block's conv narrower than its siblings
    key = "neck.merge_3.conv3.conv.weight"
    state[key] = state[key][:, :-8].clone()
    path = tmp_path / "odd.pth"
    torch.save({"epoch": 1, "model": state, "optimizer": {}}, path)
    with pytest.raises(DamoError) as err:
        load_model(path)
    msg = err.value.message
    assert "read back as: stem 3->16 k3 | K1KX 16->32 s2 k5 L1 btn16" in msg
    assert "neck.merge_3.conv3.conv.weight is [" in msg  # where the closest candidate differs
    assert "checked:" in msg and "stride pattern" in msg and "T/S/M" in msg
    # and as a user sees it: one line, exit status 2, no traceback
    assert_clean_error(damo_opt("info", path), "no architecture fits", "read back as")


def test_cli_info_and_arch_override(tmp_path: Path) -> None:
    model = _model(CASES["csp-searched"])
    ckpt = _official(tmp_path, model)
    proc = damo_opt("info", ckpt, "--json")  # as a user runs it: no flags
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    # 640x640 (the builder's default input): 8400 anchors, the checkpoint's 4 classes
    assert [o["shape"] for o in info["outputs"]] == [[1, 8400, 4], [1, 8400, 4]]
    # --arch stays an override: a preset that does not fit is refused with the reason
    with pytest.raises(DamoError, match="do not fit"):
        load_model(ckpt, arch="damo-yolo-t")
