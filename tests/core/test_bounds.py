"""Bounded inputs: no input hangs or exhausts memory (FIFOs, YAML bombs, zip bombs)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from damo_plugins.core.errors import DamoError
from damo_plugins.core.recipe import MAX_DEPTH, parse_text
from tests.conftest import assert_clean_error, damo_opt


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_fifo_model_is_refused_at_once(tmp_path: Path) -> None:
    proc = damo_opt("info", str(_fifo(tmp_path / "m.onnx")), timeout=60)
    assert_clean_error(proc, "is a FIFO, not a regular file")


def test_fifo_ir_weights_are_refused_at_once(tmp_path: Path) -> None:
    out = tmp_path / "ir"
    assert damo_opt("run", "-o", str(out), _recipe(tmp_path)).returncode == 0
    ir = tmp_path / "copy"
    ir.mkdir()
    (ir / "model.xml").write_bytes((out / "02-convert" / "model.xml").read_bytes())
    _fifo(ir / "model.bin")
    assert_clean_error(damo_opt("info", str(ir / "model.xml"), timeout=60), "FIFO")


def _recipe(tmp_path: Path) -> str:
    r = tmp_path / "r.yaml"
    r.write_text("model: tiny-cnn\nsteps: [export, convert]\n")
    return str(r)


def test_fifo_coco_image_is_refused(tmp_path: Path) -> None:
    from damo_plugins.data.coco import CocoDetection
    from damo_plugins.data.synthetic import generate

    root = generate(tmp_path / "d", train=0, val=2, seed=1)
    first = sorted((root / "val").iterdir())[0]
    first.unlink()
    _fifo(first)
    ds = CocoDetection(root / "val", root / "val.json", 64, augment=False)
    names = [r["file_name"] for r in ds.records]
    with pytest.raises(DamoError, match="FIFO"):
        ds.load_image(names.index(first.name))


def test_yaml_alias_bomb_is_refused_quickly() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    with pytest.raises(DamoError, match="expands to more than"):
        parse_text("\n".join(lines) + "\n", "bomb.yaml")


def test_deep_nesting_and_duplicate_keys() -> None:
    with pytest.raises(DamoError, match="nested too deeply"):
        parse_text("[" * 3000 + "]" * 3000, "deep.yaml")
    with pytest.raises(DamoError, match="nested too deeply"):
        parse_text("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "deep.yaml")
    with pytest.raises(DamoError, match=r"dup.yaml:3: key 'model' is given twice"):
        parse_text("model: a\nsteps: []\nmodel: b\n", "dup.yaml")
    data, _ = parse_text("base: &b {opset: 17}\nsteps: [{export: *b}]\n", "ok.yaml")
    assert data["steps"][0]["export"] == {"opset": 17}  # plain anchors still work


def _zip_bomb(path: Path, samples: int) -> None:
    """An .npz whose member declares samples x 3x64x64 float32 zeros, streamed (no RAM)."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (samples, 3, 64, 64)}
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf,
        zf.open("x.npy", "w", force_zip64=True) as fh,
    ):
        np.lib.format.write_array_header_1_0(fh, header)
        chunk = bytes(3 * 64 * 64 * 4 * 64)
        for _ in range(samples // 64):
            fh.write(chunk)


def test_npz_is_read_lazily_within_a_memory_ceiling(tmp_path: Path) -> None:
    """A ~1 MB .npz declaring 800 MB: reading 8 samples stays far below the declared size."""
    bomb = tmp_path / "bomb.npz"
    _zip_bomb(bomb, 16384)
    assert bomb.stat().st_size < 4 << 20
    code = textwrap.dedent(
        f"""
        from damo_plugins.data.calibration import read_numpy
        s = read_numpy({str(bomb)!r}, input_shape=[1, 3, 64, 64])
        assert len(s) == 16384, len(s)
        xs = [s[i] for i in range(8)]
        assert all(x.shape == (1, 3, 64, 64) and not x.any() for x in xs)
        # VmHWM belongs to this process image (ru_maxrss would include the forking parent's)
        status = open("/proc/self/status").read()
        print(int(status.split("VmHWM:")[1].split()[0]))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[-1]) < 400_000  # KiB: far below the 800 MB declared


def test_npz_declaring_more_than_it_holds_is_refused(tmp_path: Path) -> None:
    from damo_plugins.data.calibration import read_numpy

    bad = tmp_path / "lie.npz"
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**9, 3, 64, 64)}
    with zipfile.ZipFile(bad, "w") as zf, zf.open("x.npy", "w") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        fh.write(bytes(1024))
    with pytest.raises(DamoError, match="declares"):
        read_numpy(bad, input_shape=[1, 3, 64, 64])
    ok = tmp_path / "ok.npz"
    arr = np.arange(2 * 3 * 8 * 8, dtype=np.float32).reshape(2, 3, 8, 8)
    np.savez_compressed(ok, images=arr)
    s = read_numpy(ok, input_shape=[1, 3, 8, 8])
    assert np.array_equal(s[1], arr[1:2]) and np.array_equal(s[0], arr[:1])


# ------------------------------------------------------- declared sizes and damaged records
def _checkpoint(tmp_path: Path, edit) -> Path:
    """A real damo-plugins checkpoint of tiny-cnn, with its record edited by ``edit``."""
    import torch

    from damo_plugins.core.artifact import load_model

    src = load_model("tiny-cnn").save(tmp_path / "src")
    payload = torch.load(src, weights_only=True)
    edit(payload)
    out = tmp_path / "edited.pt"
    torch.save(payload, out)
    return out


DAMAGED = {
    "kwargs-a-list": (lambda p: p["arch"].__setitem__("kwargs", [1, 2]), "kwargs"),
    "transform-without-pass": (
        lambda p: p["arch"].__setitem__("transforms", [{"record": {}}]),
        "transform needs a 'pass'",
    ),
    "input-without-name": (lambda p: p.__setitem__("inputs", [{"shape": [1, 3, 8, 8]}]), "name"),
    "huge-declared-input": (
        lambda p: p.__setitem__("inputs", [{"name": "x", "shape": [60000, 60000]}]),
        "above the limit",
    ),
    "huge-width": (
        lambda p: p["arch"].__setitem__("kwargs", {"width": 10**9}),
        "above the limit",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_or_huge_checkpoint_records_are_clear_errors(tmp_path: Path, case: str) -> None:
    edit, needle = DAMAGED[case]
    path = _checkpoint(tmp_path, edit)
    proc = damo_opt("info", str(path), timeout=120)
    assert_clean_error(proc, needle)


def test_absurd_input_shape_is_refused_before_allocation() -> None:
    proc = damo_opt("info", "tiny-cnn", "--input-shape", "1,3,100000,100000", timeout=120)
    assert_clean_error(proc, "above the limit", "DAMO_MAX_ELEMENTS")


# ------------------------------------------------------------ fuzzing the record loader
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_record = st.fixed_dictionaries(
    {},
    optional={
        "builder": st.sampled_from(["tiny-cnn", "damo-yolo-t", "nope"]) | _json,
        "kwargs": st.dictionaries(
            st.sampled_from(["width", "num_classes", "depth", "x"]), _json, max_size=3
        )
        | _json,
        "transforms": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "pass": st.sampled_from(["prune", "reparam", "x"]) | _json,
                    "record": _json,
                },
            ),
            max_size=2,
        )
        | _json,
    },
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(arch=_record, specs=st.lists(_json, max_size=3))
def test_fuzz_checkpoint_records(monkeypatch, arch, specs) -> None:
    """Any architecture record or tensor record: a model or a DamoError, within a small
    element bound (so nothing large is ever allocated)."""
    from damo_plugins.core.artifact import _spec, rebuild
    from damo_plugins.core.manager import get_manager

    monkeypatch.setenv("DAMO_MAX_ELEMENTS", str(1 << 20))
    with contextlib.suppress(DamoError):
        rebuild(arch, get_manager())
    for s in specs:
        with contextlib.suppress(DamoError, ValueError):
            _spec(s)


def test_coco_record_without_bbox_names_the_file_and_record(tmp_path: Path) -> None:
    import json

    from damo_plugins.data.coco import CocoDetection
    from damo_plugins.data.synthetic import generate

    root = generate(tmp_path / "d", train=2, val=0, seed=3)
    data = json.loads((root / "train.json").read_text())
    del data["annotations"][1]["bbox"]
    (root / "train.json").write_text(json.dumps(data))
    with pytest.raises(
        DamoError,
        match=r"train.json: annotations\[1\] is not a valid COCO record \(missing key 'bbox'\)",
    ):
        CocoDetection(root / "train", root / "train.json", 64, augment=True)


def test_nul_byte_in_output_is_a_clear_error(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text('model: tiny-cnn\nsteps: [export]\noutput: "a\\0b"\n')
    assert_clean_error(damo_opt("run", str(recipe), cwd=tmp_path), "NUL byte")
