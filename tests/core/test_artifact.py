"""Loading and saving models: safe checkpoints, clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from damo_plugins.core.artifact import CHECKPOINT_KEY, load_model
from damo_plugins.core.errors import DamoError


def test_checkpoint_round_trip_is_weights_only(tmp_path: Path) -> None:
    art = load_model("tiny-cnn", model_args={"num_classes": 5})
    path = art.save(tmp_path)
    payload = torch.load(path, weights_only=True)  # must not need any code
    assert payload[CHECKPOINT_KEY] == 1
    assert payload["arch"] == {
        "builder": "tiny-cnn",
        "kwargs": {"num_classes": 5},
        "transforms": [],
    }
    again = load_model(path)
    feeds = art.example_inputs()
    for a, b in zip(art.run(feeds), again.run(feeds)):
        np.testing.assert_array_equal(a, b)
    assert again.inputs[0].shape == [1, 3, 64, 64]


def test_weights_only_state_dict_needs_arch(tmp_path: Path) -> None:
    art = load_model("tiny-cnn")
    sd_path = tmp_path / "official.pth"
    torch.save({"model": art.model.state_dict()}, sd_path)
    with pytest.raises(DamoError, match=r"holds weights only.*--arch"):
        load_model(sd_path)
    loaded = load_model(sd_path, arch="tiny-cnn")
    feeds = art.example_inputs()
    np.testing.assert_array_equal(art.run(feeds)[0], loaded.run(feeds)[0])
    with pytest.raises(DamoError, match="do not fit the architecture"):
        load_model(sd_path, arch="tiny-cnn", model_args={"width": 16})


class Evil:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_checkpoint_needing_code_is_refused(tmp_path: Path, capsys) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(DamoError, match=r"refused to load .*weights_only=True"):
        load_model(path)
    assert "code ran" not in capsys.readouterr().out
    whole_module = tmp_path / "module.pt"
    torch.save(load_model("tiny-cnn").model, whole_module)
    with pytest.raises(DamoError, match="refused to load"):
        load_model(whole_module)


@pytest.mark.parametrize("suffix", [".pt", ".onnx", ".xml"])
def test_bad_files(tmp_path: Path, suffix: str) -> None:
    with pytest.raises(DamoError, match="not found"):
        load_model(tmp_path / f"missing{suffix}")
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    with pytest.raises(DamoError, match="is empty"):
        load_model(empty)
    folder = tmp_path / f"dir{suffix}"
    folder.mkdir()
    with pytest.raises(DamoError, match="is a directory"):
        load_model(folder)
    junk = tmp_path / f"junk{suffix}"
    junk.write_bytes(b"\x00garbage\xff" * 50)
    junk.with_suffix(".bin").write_bytes(b"\x00" * 64)
    with pytest.raises(DamoError, match=r"not a (valid|readable)"):
        load_model(junk)


def test_truncated_files(tmp_path: Path) -> None:
    art = load_model("tiny-cnn")
    pt = art.save(tmp_path / "pt")
    from damo_plugins.lib.onnx_export import export_onnx

    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(export_onnx(art).SerializeToString())
    for path in (pt, onnx_path):
        data = path.read_bytes()
        cut = tmp_path / f"cut{path.suffix}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(DamoError, match=r"not a (valid|readable)|truncated|corrupt"):
            load_model(cut)


def test_openvino_xml_bin_mismatch(tmp_path: Path) -> None:
    from damo_plugins.core.manager import get_manager

    ov = get_manager().get_adapter("openvino")
    small = ov.convert(load_model("tiny-cnn"))
    small.save(tmp_path / "a")
    wide = ov.convert(load_model("tiny-cnn", model_args={"width": 16}))
    wide.save(tmp_path / "b")
    (tmp_path / "a" / "model.bin").write_bytes((tmp_path / "b" / "model.bin").read_bytes())
    with pytest.raises(DamoError, match="not a readable OpenVINO IR"):
        load_model(tmp_path / "a" / "model.xml").run(small.example_inputs())
    (tmp_path / "b" / "model.bin").unlink()
    with pytest.raises(DamoError, match=r"no weights file model\.bin"):
        load_model(tmp_path / "b" / "model.xml")


def test_unknown_model_name_suggests() -> None:
    with pytest.raises(DamoError, match=r"unknown model 'tiny-cn' .*tiny-cnn"):
        load_model("tiny-cn")


def test_a_step_result_instead_of_a_model_is_one_clear_line() -> None:
    """``api.run_pass`` returns a StepResult; handing it on as a model names the fix (it used
    to become a file name of the whole module's repr: 'File name too long')."""
    from damo_plugins import api

    step = api.run_pass("reparam", "tiny-cnn")
    with pytest.raises(
        DamoError, match="cannot load a model from an object of type StepResult"
    ) as err:
        api.run_pass("export", step)
    assert err.value.hint == "pass its .artifact"
    with pytest.raises(DamoError, match="of type int"):
        load_model(3)
