"""One resolver for every ``--data``: the layouts data sets ship in, and the three parts of them.

Users bring detection data in the layouts the ecosystem uses, and each verb accepting
``--data`` used to understand a different subset of them. :func:`resolve` understands all:

* a **COCO folder** in the standard layout: ``annotations/instances_{train,val}*.json`` with
  the images in ``images/<split>…/``, ``<split>2017/`` (``train2017``, ``val2017``), or
  ``images/``;
* the **project's own layout**: ``DATA/train/ + DATA/train.json``, ``DATA/val/ + DATA/val.json``
  (what ``damo-opt train`` and the synthetic generator write);
* a **single COCO json** with an image root (the folder named after the json, ``images/``
  beside it, or the json's own folder) — a validation split only;
* a **dataset YAML** (``path``, ``train``, ``val``, ``names``), whose ``train``/``val`` name
  COCO jsons or image folders (relative to ``path``, itself relative to the YAML);
* ``synthetic`` (or ``synthetic:TRAIN,VAL``): the embedded model's data set, generated on the
  fly (seeded) into a cache folder, with train and val splits;
* a plain **image folder** (no labels): fine for calibration and latency, refused where an
  accuracy budget is needed.

:func:`split_parts` then cuts the data into three **disjoint** parts: calibration images
(from train), a *control* split that every decision may look at (accuracy control, choosing
the best candidate), and a *held-out* split, never seen by a decision, for the reported
figures. Control and held-out come from val, cut deterministically (a seeded permutation of
the sorted image ids), so two runs on the same data cut it the same way.
:func:`materialize` writes the parts as small COCO files in the project layout (absolute image
paths inside, nothing copied), which every pass already reads (``evaluate``'s ``data``,
``prune``'s fine-tuning data, ``quantize``'s ``val`` and ``calibration: {images: DIR}``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from damo_plugins.core.errors import DamoError
from damo_plugins.core.io import check_regular, write_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
#: default size of the generated ``synthetic`` set (train, val): small enough to generate in
#: seconds, large enough for a control and a held-out split of 100 images each
SYNTHETIC_DEFAULT = (256, 200)


@dataclass(frozen=True)
class Split:
    """One split: an image root and the COCO json whose ``file_name`` values are under it."""

    name: str
    images: Path
    annotations: Path

    def load(self) -> dict[str, Any]:
        """The parsed COCO json (checked to be a detection file)."""
        return read_coco_json(self.annotations)


def read_coco_json(path: Path) -> dict[str, Any]:
    """Parse a COCO annotation file, refusing what is not one with a line naming the file.

    Only a regular file is opened (a FIFO would block forever); the top level must be an
    object with ``images`` and ``categories``. Record-level checks are the reader's.
    """
    check_regular(path, "annotation file")
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DamoError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict) or not {"images", "categories"} <= data.keys():
        raise DamoError(
            f"{path} is not a COCO detection file",
            "it needs 'images' and 'categories' (and 'annotations' for accuracy)",
        )
    return data


@dataclass
class DataSource:
    """What a ``--data`` spec names: its splits, class names and whether it has labels."""

    spec: str
    layout: str
    train: Split | None
    val: Split | None
    class_names: list[str]
    #: a plain image folder (no labels): the images, for calibration and latency only
    images: list[Path] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        """True when the val split has at least one box: mAP is defined."""
        if self.val is None:
            return False
        return bool(self.val.load().get("annotations"))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def check_classes(self, model_classes: int | None, what: str = "the model") -> None:
        """Refuse data whose class count differs from the model's (mAP would be meaningless)."""
        if model_classes is not None and self.class_names and model_classes != self.num_classes:
            raise DamoError(
                f"{what} predicts {model_classes} classes but {self.spec} has "
                f"{self.num_classes} ({', '.join(self.class_names[:8])}"
                f"{', ...' if self.num_classes > 8 else ''})",
                "give the data set the model was trained for (or fine-tune the model on it)",
            )

    def describe(self) -> str:
        parts = [f"{self.spec} ({self.layout}"]
        for s in (self.train, self.val):
            if s is not None:
                parts.append(f"{s.name}: {len(s.load()['images'])} images")
        if self.images:
            parts.append(f"{len(self.images)} unlabelled images")
        return ", ".join(parts) + ")"


# ------------------------------------------------------------------------------- resolve
def resolve(
    spec: str | os.PathLike[str] | Mapping[str, Any],
    *,
    seed: int = 0,
    cache: str | os.PathLike[str] | None = None,
) -> DataSource:
    """The data set a ``--data`` spec names (see the module docstring for the layouts).

    ``cache`` is where ``synthetic`` is generated (default: the user's cache folder); a
    mapping ``{images: DIR, annotations: FILE}`` is a single COCO json with its image root.
    """
    if isinstance(spec, Mapping):
        if set(spec) != {"images", "annotations"}:
            raise DamoError(
                f"data {dict(spec)!r}: expected exactly the keys images and annotations"
            )
        ann = Path(spec["annotations"])
        val = Split("val", _dir(Path(spec["images"]), "image root"), _file(ann))
        return _finish(str(ann), "COCO json", None, val)
    text = str(spec)
    if text == "synthetic" or text.startswith("synthetic:"):
        return _synthetic(text, seed, cache)
    path = Path(text)
    if not path.exists():
        raise DamoError(
            f"data not found: {path}",
            "give a COCO folder, DATA with train/ + train.json, a COCO .json, a dataset "
            ".yaml, an image folder, or 'synthetic'",
        )
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml"):
        return _from_yaml(path)
    if path.is_file() and path.suffix.lower() == ".json":
        return _finish(text, "COCO json", None, Split("val", _image_root(path, "val"), path))
    if path.is_file():
        raise DamoError(
            f"data {path} is neither a folder, a COCO .json nor a dataset .yaml",
            "give the data set's folder, its annotations .json or a dataset .yaml",
        )
    # the project's layout
    own = {s: path / f"{s}.json" for s in ("train", "val")}
    if any(f.is_file() for f in own.values()):
        splits = {
            s: Split(s, _dir(path / s, f"image folder of {f.name}"), f)
            for s, f in own.items()
            if f.is_file()
        }
        return _finish(text, "project layout", splits.get("train"), splits.get("val"))
    # the standard COCO layout
    ann_dir = path / "annotations"
    if ann_dir.is_dir():
        splits = {}
        for s in ("train", "val"):
            found = sorted(ann_dir.glob(f"instances_{s}*.json"))
            if found:
                splits[s] = Split(s, _coco_images(path, found[0], s), found[0])
        if not splits:
            raise DamoError(
                f"{ann_dir} holds no instances_train*.json or instances_val*.json",
                "COCO detection annotations are annotations/instances_{train,val}*.json",
            )
        return _finish(text, "COCO layout", splits.get("train"), splits.get("val"))
    images = _list_images(path)
    if images:
        return DataSource(text, "image folder (no labels)", None, None, [], images)
    raise DamoError(
        f"{path} is not a detection data folder",
        "expected annotations/instances_{train,val}*.json (COCO), train.json/val.json beside "
        "train/ and val/, a dataset .yaml, or images",
    )


def _dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DamoError(f"{what} not found: {path}", "check the data layout")
    return path


def _file(path: Path) -> Path:
    if not path.is_file():
        raise DamoError(f"annotation file not found: {path}", "check the data path")
    return path


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _image_root(ann: Path, split: str) -> Path:
    """Where a lone COCO json's images are: ``val.json`` -> ``val/``, ``images/``, or beside;
    a json inside a COCO folder's ``annotations/`` uses the COCO layout's conventions."""
    if ann.parent.name == "annotations":
        return _coco_images(ann.parent.parent, ann, split)
    for cand in (ann.with_suffix(""), ann.parent / "images" / split, ann.parent / "images"):
        if cand.is_dir():
            return cand
    return ann.parent


def _coco_images(root: Path, ann: Path, split: str) -> Path:
    """Image root of ``annotations/instances_<tag>.json`` in a COCO folder."""
    tag = ann.stem.removeprefix("instances_")  # e.g. val2017
    for cand in (
        root / "images" / tag,
        root / "images" / split,
        root / tag,
        root / split,
        root / "images",
    ):
        if cand.is_dir():
            return cand
    raise DamoError(
        f"no image folder for {ann.name} in {root}",
        f"expected {root}/images/{tag}/, {root}/images/{split}/ or {root}/{tag}/",
    )


def _finish(
    spec: str, layout: str, train: Split | None, val: Split | None, names: Any = None
) -> DataSource:
    """Check the splits agree on their classes and are not empty; read the class names."""
    if val is None and train is not None:
        raise DamoError(
            f"{spec} has a train split but no val split",
            "a val split is needed for accuracy (val.json / instances_val*.json / val: in the yaml)",
        )
    class_names: list[str] = []
    for s in (val, train):
        if s is None:
            continue
        data = s.load()
        if not data["images"]:
            raise DamoError(
                f"the {s.name} split of {spec} is empty ({s.annotations} lists no images)"
            )
        cats = sorted(data["categories"], key=lambda c: int(c["id"]))
        here = [str(c.get("name", c["id"])) for c in cats]
        if class_names and here != class_names:
            raise DamoError(
                f"the train and val splits of {spec} have different classes "
                f"({len(here)} vs {len(class_names)})",
                "both annotation files need the same categories",
            )
        class_names = here
    if names is not None:
        given = list(names.values()) if isinstance(names, Mapping) else list(names)
        if len(given) != len(class_names):
            raise DamoError(
                f"{spec}: names lists {len(given)} classes but the annotations have "
                f"{len(class_names)}",
                "make names match the categories of the COCO files",
            )
        class_names = [str(n) for n in given]
    return DataSource(spec, layout, train, val, class_names)


def _from_yaml(path: Path) -> DataSource:
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DamoError(f"cannot read dataset yaml {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict) or "val" not in doc:
        raise DamoError(f"dataset yaml {path} has no 'val' key", "it needs path, train, val, names")
    root = Path(doc.get("path") or ".")
    root = root if root.is_absolute() else path.parent / root
    splits: dict[str, Split] = {}
    for s in ("train", "val"):
        value = doc.get(s)
        if value is None:
            continue
        if isinstance(value, list):
            if len(value) != 1:
                raise DamoError(f"dataset yaml {path}: {s} must name one COCO json or folder")
            value = value[0]
        splits[s] = _yaml_split(root, str(value), s, path)
    return _finish(
        str(path), "dataset yaml", splits.get("train"), splits.get("val"), doc.get("names")
    )


def _yaml_split(root: Path, value: str, split: str, yaml_path: Path) -> Split:
    """A yaml ``train``/``val`` entry: a COCO json, or an image folder with its json found by
    the usual conventions (``<folder>.json`` beside it, ``annotations/instances_<folder>.json``)."""
    p = Path(value)
    p = p if p.is_absolute() else root / p
    if p.suffix.lower() == ".json":
        return Split(split, _image_root(_file(p), split), p)
    if p.is_dir():
        for ann in (
            p.with_suffix(".json"),
            root / "annotations" / f"instances_{p.name}.json",
            *sorted((root / "annotations").glob(f"instances_{split}*.json")),
        ):
            if ann.is_file():
                return Split(split, p, ann)
        raise DamoError(
            f"dataset yaml {yaml_path}: no COCO annotations for {split} folder {p}",
            f"point {split}: at a COCO .json, or put {p.name}.json beside the folder",
        )
    raise DamoError(
        f"dataset yaml {yaml_path}: {split} path not found: {p}", "paths are relative to 'path'"
    )


def _cache_root(cache: str | os.PathLike[str] | None) -> Path:
    if cache is not None:
        return Path(cache)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "damo-plugins"


def synthetic_root(train: int, val: int, seed: int, cache: Any = None) -> Path:
    """The generated data set of ``train`` + ``val`` images, written once per (sizes, seed)
    under the user's cache and reused by every later process (a Ray worker included): a
    temporary copy per process would be regenerated each time and left behind by a killed one.
    """
    from damo_plugins.data.synthetic import generate

    root = _cache_root(cache) / f"synthetic-s{seed}-{train}-{val}"
    if not (root / "val.json").is_file():
        # generated beside and renamed: a killed generation never looks complete
        tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        generate(tmp, train=train, val=val, seed=seed)
        if train == 0:
            shutil.rmtree(tmp / "train", ignore_errors=True)
            (tmp / "train.json").unlink(missing_ok=True)
        try:
            os.replace(tmp, root)
        except OSError:  # another process won the race: its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _synthetic(text: str, seed: int, cache: Any) -> DataSource:
    """The embedded model's data set (``synthetic`` or ``synthetic:TRAIN,VAL``)."""
    train, val = SYNTHETIC_DEFAULT
    _, _, tail = text.partition(":")
    if tail:
        try:
            train, val = (int(v) for v in tail.split(","))
        except ValueError:
            raise DamoError(
                f"'{text}' is not synthetic:TRAIN,VAL", "e.g. synthetic or synthetic:256,200"
            ) from None
        if train < 0 or val < 1:
            raise DamoError(f"'{text}': needs TRAIN >= 0 and VAL >= 1 images")
    src = resolve(synthetic_root(train, val, seed, cache))
    src.spec, src.layout = text, f"generated, seed {seed}"
    return src


# ------------------------------------------------------------------------------- parts
@dataclass
class DataParts:
    """Three disjoint parts of a data set, by image id (val) and by file (calibration)."""

    source: DataSource
    calibration: list[Path]
    control: list[int]
    held_out: list[int]
    #: where the calibration images came from (train, or a val slice when there is no train)
    calibration_from: str

    def fingerprint(self) -> str:
        """A hash of what the parts hold (files, ids, annotations), for result caches."""
        h = hashlib.sha256()
        for s in (self.source.train, self.source.val):
            if s is not None:
                st = s.annotations.stat()
                h.update(f"{s.annotations.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        h.update(json.dumps([str(p) for p in self.calibration]).encode())
        h.update(json.dumps([self.control, self.held_out]).encode())
        return h.hexdigest()[:16]


def split_parts(
    source: DataSource,
    *,
    calibration: int = 64,
    control: int | None = None,
    held_out: int | None = None,
    seed: int = 0,
) -> DataParts:
    """Cut ``source`` into calibration / control / held-out parts (disjoint, deterministic).

    Val images are permuted (seeded) and cut in two: ``control`` first (default half), then
    ``held_out`` (default the rest); when val has fewer images than both ask for, half each. Calibration images are the first ``calibration`` of a
    seeded permutation of train; without train, a third val slice after the other two.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    if source.val is None:  # unlabelled image folder: calibration only
        files = list(source.images)
        order = rng.permutation(len(files)) if files else []
        return DataParts(source, [files[i] for i in order[:calibration]], [], [], "image folder")
    val = source.val.load()
    ids = sorted(int(im["id"]) for im in val["images"])
    ids = [ids[i] for i in rng.permutation(len(ids))]
    n_ctrl = control if control is not None else max(1, len(ids) // 2)
    n_held = held_out if held_out is not None else len(ids) - n_ctrl
    if n_ctrl + n_held > len(ids):  # fewer images than asked for: half and half
        n_ctrl = max(1, len(ids) // 2)
        n_held = len(ids) - n_ctrl
    if source.train is None:
        n_cal = min(calibration, max(0, len(ids) - n_ctrl - n_held))
        if n_cal == 0:
            n_ctrl = max(1, len(ids) // 3)
            n_held = max(1, len(ids) // 3)
            n_cal = min(calibration, len(ids) - n_ctrl - n_held)
    else:
        n_cal = 0
    ctrl, held = ids[:n_ctrl], ids[n_ctrl : n_ctrl + n_held]
    if not ctrl or not held:
        raise DamoError(
            f"the val split of {source.spec} has {len(ids)} images: too few for a control "
            "and a held-out split",
            "give at least 2 validation images (a few hundred for figures worth reporting)",
        )
    by_id = {int(im["id"]): im for im in val["images"]}
    if source.train is not None:
        tr = source.train.load()["images"]
        order = rng.permutation(len(tr))[:calibration]
        calib = [source.train.images / tr[i]["file_name"] for i in order]
        origin = f"train split of {source.spec}"
    else:
        extra = ids[n_ctrl + n_held : n_ctrl + n_held + n_cal]
        calib = [source.val.images / by_id[i]["file_name"] for i in extra]
        origin = f"a val slice of {source.spec} disjoint from control and held-out (no train split)"
    if not calib:
        raise DamoError(
            f"{source.spec} leaves no images for calibration",
            "give a train split, or more validation images",
        )
    return DataParts(source, calib, ctrl, held, origin)


def _subset(split: Split, ids: Sequence[int] | None) -> dict[str, Any]:
    """A COCO dict of ``ids`` (all when None) with absolute image paths."""
    data = split.load()
    keep = None if ids is None else set(ids)
    images = []
    for im in data["images"]:
        if keep is None or int(im["id"]) in keep:
            images.append({**im, "file_name": str((split.images / im["file_name"]).resolve())})
    chosen = {int(im["id"]) for im in images}
    anns = [a for a in data.get("annotations", []) if int(a["image_id"]) in chosen]
    return {"images": images, "annotations": anns, "categories": data["categories"]}


def materialize(parts: DataParts, folder: str | os.PathLike[str]) -> Path:
    """Write the parts in the project layout under ``folder``; return ``folder``.

    ``train.json`` (fine-tuning), ``val.json`` (the control split: what passes check against),
    ``heldout.json`` (reported figures), each beside an (empty) image folder of its name — the
    json holds absolute image paths — and ``calib/``: links to the calibration images. Files
    are rewritten only when their content changes, so a resumed run sees the same inputs.
    """
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    src = parts.source
    wanted: dict[str, dict[str, Any] | None] = {
        "train": _subset(src.train, None) if src.train is not None else None,
        "val": _subset(src.val, parts.control) if src.val is not None else None,
        "heldout": _subset(src.val, parts.held_out) if src.val is not None else None,
    }
    for name, data in wanted.items():
        if data is None:
            continue
        (root / name).mkdir(exist_ok=True)
        text = json.dumps(data, separators=(",", ":"))
        target = root / f"{name}.json"
        if not target.is_file() or target.read_text() != text:
            write_text(target, text)
    calib = root / "calib"
    names = {f"{i:05d}{p.suffix.lower()}": p.resolve() for i, p in enumerate(parts.calibration)}
    current = {p.name: p for p in calib.iterdir()} if calib.is_dir() else {}
    if set(current) != set(names) or any(
        not p.is_symlink() or Path(os.readlink(p)) != names[n] for n, p in current.items()
    ):
        tmp = root / f".calib.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for n, target_path in names.items():
            (tmp / n).symlink_to(target_path)
        shutil.rmtree(calib, ignore_errors=True)
        os.replace(tmp, calib)
    return root


def model_classes(artifact: Any) -> int | None:
    """How many classes a detector artifact predicts (its builder's ``num_classes``, else the
    last dimension of its scores output), or None when it cannot be told."""
    arch = getattr(artifact, "arch", None) or {}
    n = (arch.get("kwargs") or {}).get("num_classes")
    if isinstance(n, int):
        return n
    for t in getattr(artifact, "outputs", []) or []:
        shape = list(getattr(t, "shape", []) or [])
        if len(shape) == 3 and isinstance(shape[-1], int) and shape[-1] != 4:
            return int(shape[-1])
    return None


def evaluation_folder(source: DataSource, folder: str | os.PathLike[str]) -> Path:
    """The whole val split of ``source`` as ``folder/val.json`` + ``folder/val/`` (the layout
    the ``evaluate`` pass reads), for verbs that report mAP without making decisions."""
    if source.val is None:
        raise DamoError(
            f"{source.spec} has no labels: mAP cannot be measured",
            "give labelled data (COCO annotations: a val split)",
        )
    if not source.labelled:
        raise DamoError(
            f"the val split of {source.spec} has no boxes: mAP is undefined",
            "give a validation set with annotations",
        )
    root = Path(folder)
    (root / "val").mkdir(parents=True, exist_ok=True)
    write_text(root / "val.json", json.dumps(_subset(source.val, None), separators=(",", ":")))
    return root
