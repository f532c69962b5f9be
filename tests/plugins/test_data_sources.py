"""``--data`` resolution: every layout, the three disjoint parts, and one-line errors.

The data sets are small generated ones (the synthetic generator, seed 0) re-arranged into
the layouts users ship: the standard COCO folder, a dataset YAML, a lone COCO json, the
project's own layout, an unlabelled image folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from damo_plugins.core.errors import DamoError
from damo_plugins.data.sources import (
    evaluation_folder,
    materialize,
    model_classes,
    resolve,
    split_parts,
)


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's layout: train/ + train.json, val/ + val.json (8 + 10 images)."""
    from damo_plugins.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("own"), train=8, val=10, seed=0)


def coco_layout(own: Path, root: Path) -> Path:
    """``own`` re-arranged as COCO ships: images/{train,val}2017 + annotations/instances_*."""
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        shutil.copytree(own / split, root / "images" / f"{split}2017")
        shutil.copy(own / f"{split}.json", root / "annotations" / f"instances_{split}2017.json")
    return root


def test_standard_coco_layout(own: Path, tmp_path: Path) -> None:
    src = resolve(coco_layout(own, tmp_path / "coco"))
    assert src.layout == "COCO layout"
    assert src.train is not None and src.val is not None
    assert src.train.images == tmp_path / "coco" / "images" / "train2017"
    assert src.val.annotations.name == "instances_val2017.json"
    assert src.class_names == ["circle", "square", "triangle", "ring", "cross", "star"]
    assert src.labelled


def test_coco_layout_with_2017_folders_at_the_root(own: Path, tmp_path: Path) -> None:
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    shutil.copytree(own / "val", root / "val2017")
    shutil.copy(own / "val.json", root / "annotations" / "instances_val2017.json")
    src = resolve(root)
    assert src.train is None
    assert src.val is not None and src.val.images == root / "val2017"


def test_dataset_yaml(own: Path, tmp_path: Path) -> None:
    coco_layout(own, tmp_path / "coco")
    names = ["a", "b", "c", "d", "e", "f"]
    (tmp_path / "data.yaml").write_text(
        "path: coco\n"
        "train: annotations/instances_train2017.json\n"  # a json: images found by convention
        "val: images/val2017\n"  # a folder: its json found in annotations/
        f"names: {json.dumps(names)}\n"
    )
    src = resolve(tmp_path / "data.yaml")
    assert src.layout == "dataset yaml"
    assert src.train is not None and src.train.images == tmp_path / "coco" / "images" / "train2017"
    assert src.val is not None and src.val.annotations.name == "instances_val2017.json"
    assert src.class_names == names


def test_dataset_yaml_names_must_match_the_annotations(own: Path, tmp_path: Path) -> None:
    coco_layout(own, tmp_path / "coco")
    (tmp_path / "data.yaml").write_text(
        "path: coco\nval: annotations/instances_val2017.json\nnames: {0: a, 1: b, 2: c}\n"
    )
    with pytest.raises(DamoError, match="names lists 3 classes but the annotations have 6"):
        resolve(tmp_path / "data.yaml")


def test_single_json_and_project_layout(own: Path) -> None:
    lone = resolve(own / "val.json")  # images in val/ beside val.json
    assert lone.train is None and lone.val is not None and lone.val.images == own / "val"
    mine = resolve(own)
    assert mine.layout == "project layout" and mine.train is not None


def test_parts_are_disjoint_deterministic_and_readable(own: Path, tmp_path: Path) -> None:
    from damo_plugins.data.coco import CocoDetection

    src = resolve(own)
    parts = split_parts(src, calibration=5, seed=0)
    assert len(parts.control) == 5 and len(parts.held_out) == 5
    assert not set(parts.control) & set(parts.held_out)
    assert sorted(parts.control + parts.held_out) == list(range(1, 11))
    assert len(parts.calibration) == 5 and all(p.parent == own / "train" for p in parts.calibration)
    again = split_parts(resolve(own), calibration=5, seed=0)
    assert (again.control, again.held_out, again.calibration) == (
        parts.control,
        parts.held_out,
        parts.calibration,
    )
    assert again.fingerprint() == parts.fingerprint()
    other = split_parts(src, calibration=5, seed=1)
    assert other.control != parts.control  # the seed decides the cut
    folder = materialize(parts, tmp_path / "parts")
    control = CocoDetection(folder / "val", folder / "val.json", 64)
    held = CocoDetection(folder / "heldout", folder / "heldout.json", 64)
    assert sorted(int(r["id"]) for r in control.records) == sorted(parts.control)
    assert sorted(int(r["id"]) for r in held.records) == sorted(parts.held_out)
    image, _, _ = control[0]
    assert tuple(image.shape) == (3, 64, 64)
    calib = sorted((folder / "calib").iterdir())
    assert [p.resolve() for p in calib] == [p.resolve() for p in parts.calibration]


def test_without_train_calibration_comes_from_a_third_val_slice(own: Path) -> None:
    parts = split_parts(resolve(own / "val.json"), calibration=4, control=3, held_out=3)
    val_dir = own / "val"
    ctrl_files = {f"{i:06d}.jpg" for i in (x - 1 for x in parts.control + parts.held_out)}
    assert len(parts.calibration) == 4
    assert all(p.parent == val_dir and p.name not in ctrl_files for p in parts.calibration)
    assert "no train split" in parts.calibration_from


def test_unlabelled_folder_and_errors(own: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pics"
    shutil.copytree(own / "val", folder)
    src = resolve(folder)
    assert not src.labelled and len(src.images) == 10
    assert len(split_parts(src, calibration=3).calibration) == 3
    with pytest.raises(DamoError, match="no labels"):
        evaluation_folder(src, tmp_path / "ev")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "val").mkdir()
    data = json.loads((own / "val.json").read_text())
    (empty / "val.json").write_text(json.dumps({**data, "images": [], "annotations": []}))
    with pytest.raises(DamoError, match=r"the val split of .* is empty"):
        resolve(empty)
    with pytest.raises(DamoError, match="data not found"):
        resolve(tmp_path / "missing")
    with pytest.raises(DamoError, match="not a detection data folder"):
        resolve(tmp_path / "ev" if (tmp_path / "ev").exists() else empty / "val")


def test_class_count_mismatch_with_a_model(own: Path, tmp_path: Path) -> None:
    """A user's 3-class set against the 6-class embedded model: refused in one line."""
    from damo_plugins.core.artifact import load_model
    from damo_plugins.demo import embedded_checkpoint

    data = json.loads((own / "val.json").read_text())
    data["categories"] = data["categories"][:3]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] <= 3]
    root = tmp_path / "three"
    shutil.copytree(own / "val", root / "val")
    (root / "val.json").write_text(json.dumps(data))
    src = resolve(root)
    ckpt = embedded_checkpoint("damo-yolo-nano-synth.pt")
    assert ckpt is not None
    n = model_classes(load_model(str(ckpt)))
    assert n == 6
    with pytest.raises(DamoError, match=r"predicts 6 classes but .* has 3"):
        src.check_classes(n)


def test_synthetic_is_generated_once(tmp_path: Path) -> None:
    src = resolve("synthetic:3,4", cache=tmp_path)
    assert src.layout == "generated, seed 0" and src.class_names[0] == "circle"
    assert src.train is not None and src.val is not None
    stamp = src.val.annotations.stat().st_mtime_ns
    again = resolve("synthetic:3,4", cache=tmp_path)
    assert again.val is not None and again.val.annotations.stat().st_mtime_ns == stamp
    with pytest.raises(DamoError, match="synthetic:TRAIN,VAL"):
        resolve("synthetic:lots", cache=tmp_path)


def test_evaluation_data_is_the_same_cached_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``data: generated`` in an evaluate step reads the set ``synthetic:0,N`` names, from the
    user's cache: nothing is regenerated per process or left in the temporary folder."""
    from damo_plugins.data.evaluate import generated_data

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    root = generated_data(5, 0)
    assert root.parent == tmp_path / "damo-plugins" and (root / "val.json").is_file()
    assert not (root / "train").exists()
    src = resolve("synthetic:0,5")
    assert src.val is not None and src.val.annotations == root / "val.json"
    assert generated_data(5, 0) == root
