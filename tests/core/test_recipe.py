"""Recipe validation: every problem named with its place in the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from damo_plugins.core.errors import DamoError
from damo_plugins.core.manager import get_manager
from damo_plugins.core.recipe import check_chain, load_recipe


def _load(tmp_path: Path, text: str, name: str = "r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return load_recipe(p, get_manager())


def test_valid_recipe_yaml_and_json(tmp_path: Path) -> None:
    r = _load(tmp_path, "model: tiny-cnn\nsteps:\n  - export: {opset: 18}\n  - convert\n")
    assert [s.name for s in r.steps] == ["export", "convert"]
    assert r.steps[0].config.opset == 18
    assert check_chain(r) == ["torch", "onnx", "openvino"]
    j = _load(tmp_path, '{"model": "tiny-cnn", "steps": [{"export": {"opset": 16}}]}', "r.json")
    assert j.steps[0].config.opset == 16


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (
            "model: tiny-cnn\nstepz: []\n",
            r"r\.yaml:2: stepz: unknown option 'stepz' \(did you mean 'steps'\?\)",
        ),
        (
            "model: tiny-cnn\nsteps:\n  - export\n  - exprot\n",
            r"r\.yaml:4: steps\[1\]: unknown step 'exprot' \(did you mean 'export'\?\)",
        ),
        (
            "model: tiny-cnn\nsteps:\n  - export:\n      opsett: 17\n",
            r"r\.yaml:4: steps\[0\]\.export\.opsett: unknown option 'opsett' \(did you mean 'opset'\?\)",
        ),
        (
            "model: tiny-cnn\nsteps:\n  - export: {opset: 11}\n",
            r"r\.yaml:3: steps\[0\]\.export\.opset: .*greater than or equal to 16",
        ),
        (
            "model: tiny-cnn\nsteps:\n  - export: {dynamic_batch: maybe}\n",
            r"steps\[0\]\.export\.dynamic_batch: .*boolean",
        ),
        ("model: tiny-cnn\ninput_shape: [1, 3, -4, 4]\n", r"r\.yaml:2: input_shape: .*positive"),
        ("model: [unclosed\n", r"r\.yaml:2: recipe is not valid YAML/JSON"),
        ("- just\n- a list\n", r"a recipe must be a mapping"),
        ("model: tiny-cnn\nsteps:\n  - export: 5\n", r"options must be a mapping"),
        ("model: tiny-cnn\nsteps:\n  - {export: {}, convert: {}}\n", r"one-key mapping"),
        ("steps: []\n", r"model: Field required"),
        ("model: !!python/object/apply:os.system ['echo hacked']\n", r"not valid YAML"),
    ],
)
def test_recipe_errors(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(DamoError, match=pattern):
        _load(tmp_path, text)


def test_step_that_cannot_take_the_format(tmp_path: Path) -> None:
    r = _load(tmp_path, "model: tiny-cnn\nsteps:\n  - export\n  - export\n")
    with pytest.raises(
        DamoError,
        match=r"steps\[1\]: step 'export' cannot take a onnx model \(produced by step 'export'\)",
    ):
        check_chain(r)


def test_missing_and_empty_recipe_files(tmp_path: Path) -> None:
    with pytest.raises(DamoError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml", get_manager())
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(DamoError, match="recipe file is empty"):
        load_recipe(tmp_path / "empty.yaml", get_manager())
    with pytest.raises(DamoError, match="is a directory"):
        load_recipe(tmp_path, get_manager())
