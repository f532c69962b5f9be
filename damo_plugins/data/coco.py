"""A COCO-JSON + image-folder detection data set, with DAMO-YOLO's preprocessing.

Preprocessing is what DAMO-YOLO's models expect: RGB, float values 0–255 (no mean/std
normalisation), the image resized keeping its aspect ratio so its longer side is ``img_size``
and padded with zeros on the bottom/right to a square ``img_size`` canvas. Boxes are returned
in that canvas's pixels, so predictions map back to the original image by dividing by
``scale``.

Augmentation (training only) is deliberately simple — horizontal flip and scale jitter with a
random placement (parts pushed off the canvas are cropped; boxes that keep less than 40 % of
their area are dropped) — because mosaic/mix-up pipelines cost more CPU than our small models.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from damo_plugins.core.errors import DamoError
from damo_plugins.core.io import check_regular
from damo_plugins.data.sources import read_coco_json


def letterbox(
    img: Image.Image, size: int, scale: float, offset: tuple[int, int] = (0, 0)
) -> np.ndarray:
    """Resize ``img`` by ``scale`` and paste it at ``offset`` on a zero ``size`` x ``size`` canvas.

    Returns a float32 CHW array (RGB, 0–255).
    """
    w, h = img.size
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = np.asarray(img.resize((nw, nh), Image.BILINEAR), dtype=np.float32)
    canvas = np.zeros((size, size, 3), dtype=np.float32)
    ox, oy = offset
    sx0, sy0 = max(0, -ox), max(0, -oy)
    dx0, dy0 = max(0, ox), max(0, oy)
    cw, ch = min(nw - sx0, size - dx0), min(nh - sy0, size - dy0)
    if cw > 0 and ch > 0:
        canvas[dy0 : dy0 + ch, dx0 : dx0 + cw] = resized[sy0 : sy0 + ch, sx0 : sx0 + cw]
    return np.ascontiguousarray(canvas.transpose(2, 0, 1))


class CocoDetection:
    """Images of a folder annotated by a COCO JSON file (``bbox`` annotations).

    ``dataset[i]`` is ``(image, targets, info)``: a float32 ``[3, S, S]`` tensor, a float32
    ``[n, 5]`` tensor of ``(class, x1, y1, x2, y2)`` in canvas pixels (classes are contiguous
    0..C-1 in the order of the sorted category ids) and ``{"image_id", "scale", "offset"}``.
    """

    def __init__(
        self,
        images: str | Path,
        annotations: str | Path,
        img_size: int = 320,
        *,
        augment: bool = False,
        scale_jitter: tuple[float, float] = (0.7, 1.2),
        flip_prob: float = 0.5,
        seed: int = 0,
    ) -> None:
        self.images = Path(images)
        self.annotations = Path(annotations)
        if not self.images.is_dir():
            raise DamoError(f"image folder not found: {self.images}", "check the data path")
        data = read_coco_json(self.annotations)
        self.img_size = int(img_size)
        self.augment = augment
        self.scale_jitter = scale_jitter
        self.flip_prob = flip_prob
        self.rng = np.random.default_rng(seed)
        section, index = "categories", 0
        try:
            self.cat_ids: list[int] = sorted(int(c["id"]) for c in data["categories"])
            self.class_names: list[str] = [
                next(str(c.get("name", cid)) for c in data["categories"] if int(c["id"]) == cid)
                for cid in self.cat_ids
            ]
            cat_index = {cid: i for i, cid in enumerate(self.cat_ids)}
            section = "images"
            self.records: list[dict[str, Any]] = []
            for index, im in enumerate(data["images"]):  # noqa: B007 - named in the error
                self.records.append({**im, "id": int(im["id"]), "file_name": str(im["file_name"])})
            boxes: dict[int, list[list[float]]] = {im["id"]: [] for im in self.records}
            section = "annotations"
            for index, a in enumerate(data.get("annotations", [])):  # noqa: B007 - named in the error
                if a.get("iscrowd", 0) or int(a["image_id"]) not in boxes:
                    continue
                x, y, w, h = (float(v) for v in a["bbox"])
                if w <= 1 or h <= 1:
                    continue
                cls = cat_index[int(a["category_id"])]
                boxes[int(a["image_id"])].append([cls, x, y, x + w, y + h])
        except (KeyError, TypeError, ValueError) as exc:
            what = (
                f"missing key {exc}"
                if isinstance(exc, KeyError)
                else f"{type(exc).__name__}: {exc}"
            )
            raise DamoError(
                f"{self.annotations}: {section}[{index}] is not a valid COCO record ({what})",
                "fix or remove that record",
            ) from None
        self.boxes = {k: np.asarray(v, dtype=np.float32).reshape(-1, 5) for k, v in boxes.items()}

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, index: int) -> Image.Image:
        path = self.images / self.records[index]["file_name"]
        check_regular(path, "image")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as exc:
            raise DamoError(f"cannot read image {path}: {exc}", "check the data folder") from exc

    def __getitem__(self, index: int) -> tuple[Any, Any, dict[str, Any]]:
        import torch

        rec = self.records[index]
        img = self.load_image(index)
        w, h = img.size
        boxes = self.boxes[int(rec["id"])].copy()
        scale = self.img_size / max(w, h)
        offset = (0, 0)
        if self.augment:
            if self.rng.random() < self.flip_prob:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
                boxes[:, [1, 3]] = w - boxes[:, [3, 1]]
            scale *= float(self.rng.uniform(*self.scale_jitter))
            nw, nh = round(w * scale), round(h * scale)
            offset = (
                int(self.rng.integers(min(0, self.img_size - nw), max(0, self.img_size - nw) + 1)),
                int(self.rng.integers(min(0, self.img_size - nh), max(0, self.img_size - nh) + 1)),
            )
        pixels = letterbox(img, self.img_size, scale, offset)
        if len(boxes):
            boxes[:, 1:] = boxes[:, 1:] * scale + np.array(offset * 2, dtype=np.float32)
            boxes = _clip_boxes(boxes, self.img_size)
        info = {"image_id": int(rec["id"]), "scale": scale, "offset": offset, "size": (h, w)}
        return torch.from_numpy(pixels), torch.from_numpy(boxes), info


def _clip_boxes(boxes: np.ndarray, size: int, keep_frac: float = 0.4) -> np.ndarray:
    area = (boxes[:, 3] - boxes[:, 1]) * (boxes[:, 4] - boxes[:, 2])
    clipped = boxes.copy()
    clipped[:, 1:] = np.clip(boxes[:, 1:], 0, size)
    new_area = (clipped[:, 3] - clipped[:, 1]) * (clipped[:, 4] - clipped[:, 2])
    keep = (
        (new_area >= keep_frac * np.maximum(area, 1e-6))
        & (clipped[:, 3] - clipped[:, 1] > 2)
        & (clipped[:, 4] - clipped[:, 2] > 2)
    )
    return clipped[keep]


def collate(
    batch: Sequence[tuple[Any, Any, dict[str, Any]]],
) -> tuple[Any, list[Any], list[dict[str, Any]]]:
    """Stack images; keep the per-image targets and infos as lists."""
    import torch

    images = torch.stack([b[0] for b in batch])
    return images, [b[1] for b in batch], [b[2] for b in batch]


def data_loader(
    dataset: CocoDetection, batch_size: int, *, shuffle: bool, seed: int = 0, workers: int = 0
) -> Any:
    """A ``torch`` data loader with our collate function and a seeded shuffle."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collate,
        generator=g,
        num_workers=workers,
        drop_last=False,
    )
