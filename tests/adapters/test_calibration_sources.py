"""Calibration sources: image folders, numpy files, generated images, and their errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from damo_plugins.core.errors import DamoError
from damo_plugins.data.calibration import (
    CalibrationSet,
    generated_images,
    read_images,
    read_numpy,
    resolve_calibration,
)

SHAPE = [1, 3, 32, 48]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("calib")
    # A wide red image (letterbox leaves the bottom padded) and a square blue PNG.
    Image.new("RGB", (96, 32), (255, 0, 0)).save(d / "a.jpg", quality=95)
    Image.new("RGB", (40, 40), (0, 0, 255)).save(d / "b.png")
    Image.new("L", (20, 30), 128).save(d / "c.png")  # greyscale -> converted to RGB
    (d / "notes.txt").write_text("not an image, and not picked up")
    return d


def test_images_are_rgb_float_0_255_nchw(image_dir: Path) -> None:
    data = read_images(image_dir, input_shape=SHAPE)
    assert len(data) == 3
    first = data[0]
    assert first.shape == (1, 3, 32, 48) and first.dtype == np.float32
    # Red channel saturated where the image is, 0-255 scale (no mean/std normalisation).
    assert first[0, 0, :8, :].min() > 240 and first[0, 1, :8, :].max() < 15
    # Re-iterable: the same values on a second pass (backends read the data several times).
    again = list(data)
    np.testing.assert_array_equal(again[0], first)


def test_letterbox_pads_bottom_right_and_stretch_fills(image_dir: Path) -> None:
    boxed = read_images(image_dir, input_shape=SHAPE, resize="letterbox")[0]
    stretched = read_images(image_dir, input_shape=SHAPE, resize="stretch")[0]
    # 96x32 into 48x32 keeps the ratio: 48x16 of image, the bottom 16 rows padded with 0.
    assert boxed[0, 0, :16].min() > 240
    assert np.all(boxed[0, :, 17:] == 0)
    assert stretched[0, 0].min() > 240


def test_size_limits_the_number_of_images(image_dir: Path) -> None:
    assert len(read_images(image_dir, input_shape=SHAPE, size=2)) == 2


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DamoError, match=r"holds no images") as exc:
        read_images(tmp_path, input_shape=SHAPE)
    assert str(tmp_path) in str(exc.value)


def test_undecodable_image_names_the_file(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(DamoError, match=r"broken\.jpg"):
        read_images(tmp_path, input_shape=SHAPE)


def test_numpy_npy_and_npz(tmp_path: Path) -> None:
    stack = np.random.default_rng(0).uniform(0, 255, (5, 3, 32, 48)).astype(np.float32)
    np.save(tmp_path / "x.npy", stack)
    np.savez(tmp_path / "x.npz", a=stack[:2], b=stack[2])
    npy = read_numpy(tmp_path / "x.npy", input_shape=SHAPE)
    assert len(npy) == 5 and npy[4].shape == (1, 3, 32, 48)
    np.testing.assert_array_equal(npy[3][0], stack[3])
    npz = read_numpy(tmp_path / "x.npz", input_shape=SHAPE)
    assert len(npz) == 3
    np.testing.assert_array_equal(npz[2][0], stack[2])


def test_numpy_shape_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(DamoError, match=r"bad\.npy.*\[2, 3, 16, 16\].*\[N, 3, 32, 48\]"):
        read_numpy(tmp_path / "bad.npy", input_shape=SHAPE)


def test_generated_is_seeded_and_in_range() -> None:
    a = generated_images(4, input_shape=SHAPE, seed=1)
    b = generated_images(4, input_shape=SHAPE, seed=1)
    c = generated_images(4, input_shape=SHAPE, seed=2)
    np.testing.assert_array_equal(a[3], b[3])
    assert not np.array_equal(a[0], c[0])
    assert a[0].min() >= 0 and a[0].max() <= 255 and a[0].std() > 10


def test_resolve_specs(image_dir: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 32, 48), np.float32))
    assert len(resolve_calibration("generated:5", SHAPE)) == 5
    assert len(resolve_calibration({"generated": 3}, SHAPE)) == 3
    assert len(resolve_calibration(str(image_dir), SHAPE)) == 3
    assert (
        len(resolve_calibration({"images": str(image_dir), "size": 1, "resize": "stretch"}, SHAPE))
        == 1
    )
    assert len(resolve_calibration(str(tmp_path / "x.npy"), SHAPE)) == 2
    subset = resolve_calibration("generated:10", SHAPE).subset(8, 20)
    assert isinstance(subset, CalibrationSet) and len(subset) == 2
    with pytest.raises(DamoError, match="neither a folder"):
        resolve_calibration("no/such/place", SHAPE)
    with pytest.raises(DamoError, match="exactly one source"):
        resolve_calibration({"imagez": "x"}, SHAPE)
    with pytest.raises(DamoError, match="static input shape"):
        resolve_calibration("generated", [1, 3, "h", "w"])
