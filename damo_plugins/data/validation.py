"""Labelled validation data (COCO) as a metric source for accuracy-controlled quantization.

With labelled data and a detector, ``max_drop`` is an absolute COCO mAP@[.5:.95] drop
(:class:`LabelledDetections`); with unlabelled data it is a drop in agreement with the FP32
model (:func:`damo_plugins.lib.fidelity.fidelity`). Adapters recognise a labelled set by its
``score_outputs`` method (see :func:`damo_plugins.core.adapter.is_labelled`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from damo_plugins.core.adapter import MAP
from damo_plugins.core.errors import DamoError
from damo_plugins.lib.fidelity import detector_outputs


class LabelledDetections(Sequence[np.ndarray]):
    """A COCO-labelled validation set: model inputs plus ground truth, scored by mAP@[.5:.95].

    Items are the preprocessed images (``[1, 3, S, S]`` float32, DAMO letterbox), so it can
    stand wherever plain validation inputs do (held-out checks, backend datasets); what it
    adds is :meth:`score_outputs`, the COCO mAP of raw model outputs on (a subset of) its
    images. With it, ``max_drop`` is an absolute mAP drop instead of an agreement drop.
    """

    metric = MAP

    def __init__(
        self,
        images: list[np.ndarray],
        infos: list[dict[str, Any]],
        annotations: dict[str, Any],
        cat_ids: list[int],
        source: str,
    ) -> None:
        self.images, self.infos = images, infos
        self.annotations, self.cat_ids, self.source = annotations, cat_ids, source

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        return self.images[index]

    def __repr__(self) -> str:
        return f"LabelledDetections({self.source!r}, {len(self)} images)"

    def score_outputs(
        self, outputs: Sequence[Sequence[Any]], indices: Sequence[int] | None = None
    ) -> float:
        """mAP@[.5:.95] of ``outputs[k]`` = the model's outputs on image ``indices[k]``."""
        from damo_plugins.data.evaluate import detection_map

        idx = list(range(len(self))) if indices is None else [int(i) for i in indices]
        for out in outputs[:1]:
            self.check_outputs(out)
        infos = [self.infos[i] for i in idx]
        return float(detection_map(outputs, infos, self.annotations, self.cat_ids)["mAP"])

    def check_outputs(self, outputs: Sequence[Any]) -> None:
        """A clear error unless ``outputs`` are a detector's and its classes match the labels."""
        det = detector_outputs([np.asarray(o) for o in outputs])
        if det is None or len(outputs) != 2:
            raise DamoError(
                f"mAP needs a detector's (scores [N, A, C], boxes [N, A, 4]) outputs, got "
                f"shapes {[list(np.shape(o)) for o in outputs]}",
                "give plain images/.npy as --val to score agreement with FP32 instead",
            )
        classes = int(np.shape(outputs[det[0]])[-1])
        if classes != len(self.cat_ids):
            raise DamoError(
                f"the model predicts {classes} classes but {self.source} has "
                f"{len(self.cat_ids)} categories, so mAP would be meaningless",
                "validate on data labelled with the model's classes",
            )

    def score(
        self, run: Callable[[list[np.ndarray]], Sequence[Any]], indices: Sequence[int] | None = None
    ) -> float:
        """mAP@[.5:.95] of ``run`` (feeds -> outputs) on (a subset of) the images."""
        idx = list(range(len(self))) if indices is None else [int(i) for i in indices]
        return self.score_outputs([run([self.images[i]]) for i in idx], idx)


def coco_source(spec: Any) -> tuple[Path, Path] | None:
    """(image folder, COCO JSON) if a validation spec names labelled detection data, else None.

    Accepted: our data layout (a folder with ``val/`` + ``val.json``, as ``damo-opt train``
    and the synthetic generator write it), a COCO ``.json`` (images in the folder named after
    it, ``val.json`` -> ``val/``, else beside it), or ``{coco: DIR_or_JSON, images: DIR,
    split: val}`` in a recipe. A plain image folder is not one (it has no labels).
    """
    split, images = "val", None
    if isinstance(spec, Mapping):
        if "coco" not in spec:
            return None
        extra = set(spec) - {"coco", "images", "split"}
        if extra:
            raise DamoError(
                f"labelled validation {dict(spec)!r}: unknown option(s) {', '.join(map(str, extra))}",
                "use {coco: DIR or FILE.json, images: DIR, split: val}",
            )
        split = str(spec.get("split", split))
        images = Path(spec["images"]) if spec.get("images") else None
        spec = spec["coco"]
    elif not isinstance(spec, (str, Path)):
        return None
    path = Path(spec)
    if path.is_dir() and (path / f"{split}.json").is_file():
        folder = images or path / split
        if not folder.is_dir():
            raise DamoError(
                f"{path / f'{split}.json'} has no image folder {folder}",
                f"expected {path}/{split}/ beside it",
            )
        return folder, path / f"{split}.json"
    if path.suffix.lower() == ".json":
        if not path.is_file():
            raise DamoError(f"COCO annotation file not found: {path}", "check the --val path")
        if images is None:
            images = path.with_suffix("") if path.with_suffix("").is_dir() else path.parent
        return images, path
    if isinstance(spec, Mapping) or images is not None:
        raise DamoError(
            f"{path} is not labelled detection data", f"expected {path}/{split}.json or a .json"
        )
    return None


def labelled_validation(
    spec: Any, input_shape: Sequence[Any] | None, size: int | None = None
) -> LabelledDetections | None:
    """The first ``size`` images (all when ``None``) of a COCO validation source, preprocessed.

    ``None`` if ``spec`` is not labelled detection data (see :func:`coco_source`).
    Preprocessing is DAMO-YOLO's evaluation (and our ``evaluate`` step's): longer side to the
    input size, zero padding bottom/right.
    """
    import json

    from damo_plugins.data.coco import CocoDetection

    found = coco_source(spec)
    if found is None:
        return None
    folder, ann = found
    shape = list(input_shape or [])
    if len(shape) != 4 or not isinstance(shape[2], int) or shape[2] != shape[3] or shape[2] <= 0:
        raise DamoError(
            f"mAP validation needs a static square image input [N, 3, S, S], not {shape}",
            "give --input-shape 1,3,S,S",
        )
    dataset = CocoDetection(folder, ann, int(shape[2]), augment=False)
    n = len(dataset) if size is None else min(size, len(dataset))
    if n == 0:
        raise DamoError(f"{ann} lists no images", "give a validation set with labelled images")
    images, infos = [], []
    for i in range(n):
        image, _, info = dataset[i]
        images.append(np.ascontiguousarray(image.numpy()[None], dtype=np.float32))
        infos.append(info)
    data = json.loads(Path(ann).read_text())
    ids = {int(info["image_id"]) for info in infos}
    gt = {
        "images": [im for im in data["images"] if int(im["id"]) in ids],
        "annotations": [a for a in data.get("annotations", []) if int(a["image_id"]) in ids],
        "categories": data["categories"],
    }
    if not gt["annotations"]:
        raise DamoError(
            f"the first {n} validation images of {ann} have no boxes: mAP is undefined",
            "give validation images with annotations (or more of them: val_size)",
        )
    return LabelledDetections(images, infos, gt, list(dataset.cat_ids), f"{ann} ({n} images)")
