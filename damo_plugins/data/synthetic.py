"""A seeded, generated detection data set (no download possible here, so we make our own).

Each image (256–320 px per side, so aspect ratios vary) shows a few objects of six shape
classes — circle, square, triangle, ring, cross, star — over a cluttered, noisy background.
The task is made deliberately *not* trivial, so that a small model lands well below 1.0 mAP:

* a class is its **shape**; colour only leans towards a class hue (60 % of objects), the rest
  take any colour, so colour alone does not solve it;
* five textures (solid, stripes, checker, dots, gradient) are drawn independently of class;
* objects are squashed (aspect 0.6–1.6), rotated, 12–110 px, and may overlap (box IoU up to
  0.3, later objects occlude earlier ones);
* clutter: random lines, irregular blobs and arcs in object-like colours, behind and in front;
* background: a two-colour gradient with blotches, some blur, Gaussian pixel noise.

Boxes are the tight box of the drawn polygon. Every image has its own random stream derived
from ``(seed, split, index)``, so an image does not depend on how many others are generated and
two runs with the same seed write identical files. Output is an image folder per split plus a
COCO-format JSON (``<root>/train.json``, ``<root>/val.json``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from damo_plugins.core.errors import DamoError
from damo_plugins.core.io import write_text
from damo_plugins.lib.boxes import box_iou

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "ring", "cross", "star")
#: hue (degrees) each class leans towards
CLASS_HUES = (0.0, 210.0, 120.0, 50.0, 280.0, 25.0)
TEXTURES = ("solid", "stripes", "checker", "dots", "gradient")
SPLITS = ("train", "val")
_SPLIT_KEYS = {"train": 1, "val": 2}


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the generator (the defaults are what the benchmarks use)."""

    min_side: int = 256
    max_side: int = 320
    min_objects: int = 2
    max_objects: int = 7
    min_size: int = 12
    max_size: int = 110
    max_iou: float = 0.3
    class_colour_prob: float = 0.6
    clutter: tuple[int, int] = (3, 10)
    noise_sigma: tuple[float, float] = (3.0, 12.0)
    jpeg_quality: int = 92


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    h = (h % 360.0) / 60.0
    c = v * s
    x = c * (1 - abs(h % 2 - 1))
    m = v - c
    i = int(h) % 6
    r, g, b = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][i]
    return np.array([(r + m) * 255, (g + m) * 255, (b + m) * 255], dtype=np.float32)


def _random_colour(rng: np.random.Generator, hue: float | None = None) -> np.ndarray:
    h = rng.uniform(0, 360) if hue is None else hue + rng.uniform(-22, 22)
    return _hsv_to_rgb(h, rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0))


def _polygon(kind: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Unit-size outline(s) centred at 0 (radius ~1); the first is filled, others are holes."""
    if kind in ("circle", "ring"):
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        outer = np.stack([np.cos(t), np.sin(t)], 1)
        if kind == "circle":
            return [outer]
        return [outer, outer * rng.uniform(0.45, 0.7)]
    if kind == "square":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)]
    if kind == "triangle":
        apex = rng.uniform(-0.8, 0.8)
        return [np.array([[apex, -1], [1, 1], [-1, 1]], dtype=np.float64)]
    if kind == "cross":
        a = rng.uniform(0.25, 0.42)
        pts = [
            (-a, -1),
            (a, -1),
            (a, -a),
            (1, -a),
            (1, a),
            (a, a),
            (a, 1),
            (-a, 1),
            (-a, a),
            (-1, a),
            (-1, -a),
            (-a, -a),
        ]
        return [np.array(pts, dtype=np.float64)]
    if kind == "star":
        n = int(rng.integers(5, 7))
        inner = rng.uniform(0.38, 0.55)
        t = np.arange(2 * n) * np.pi / n - np.pi / 2
        r = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
        return [np.stack([r * np.cos(t), r * np.sin(t)], 1)]
    raise ValueError(kind)


def _texture(rng: np.random.Generator, h: int, w: int, c1: np.ndarray) -> np.ndarray:
    kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
    if kind == "solid":
        return np.broadcast_to(c1, (h, w, 3)).copy()
    c2 = c1 * rng.uniform(0.3, 0.7) if rng.random() < 0.5 else _random_colour(rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "stripes":
        ang = rng.uniform(0, np.pi)
        period = rng.uniform(4, 12)
        sel = ((xx * math.cos(ang) + yy * math.sin(ang)) // (period / 2)) % 2 == 0
    elif kind == "checker":
        period = rng.uniform(4, 12)
        sel = ((xx // period) + (yy // period)) % 2 == 0
    elif kind == "dots":
        period = rng.uniform(5, 10)
        sel = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) > (
            period / 3.5
        ) ** 2
    else:  # gradient
        t = (
            (xx / max(w - 1, 1))[..., None]
            if rng.random() < 0.5
            else (yy / max(h - 1, 1))[..., None]
        )
        return c1 * (1 - t) + c2 * t
    return np.where(sel[..., None], c1, c2)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    c1, c2 = (
        _random_colour(rng) * rng.uniform(0.4, 1.0),
        _random_colour(rng) * rng.uniform(0.4, 1.0),
    )
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    t = xx * math.cos(ang) + yy * math.sin(ang)
    t = ((t - t.min()) / max(float(np.ptp(t)), 1.0))[..., None]
    img = c1 * (1 - t) + c2 * t
    # low-frequency blotches: a coarse random field, upsampled
    coarse = rng.normal(0, 18, (4, 4, 3)).astype(np.float32)
    blot = np.asarray(
        Image.fromarray(np.uint8(np.clip(coarse + 128, 0, 255))).resize((w, h), Image.BICUBIC)
    )
    return img + (blot.astype(np.float32) - 128)


def _paint(
    img: np.ndarray,
    outlines: Sequence[np.ndarray],
    tex_rng: np.random.Generator,
    colour: np.ndarray,
) -> tuple[list[float], int] | None:
    """Fill the polygon(s) (absolute pixel coords) with a texture; return (xyxy box, area)."""
    h, w = img.shape[:2]
    pts = outlines[0]
    x0, y0 = np.floor(pts.min(0)).astype(int)
    x1, y1 = np.ceil(pts.max(0)).astype(int)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    mask = Image.new("L", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(mask)
    draw.polygon([tuple(p) for p in (pts - [x0, y0])], fill=255)
    for hole in outlines[1:]:
        draw.polygon([tuple(p) for p in (hole - [x0, y0])], fill=0)
    m = np.asarray(mask) > 127
    if not m.any():
        return None
    region = img[y0:y1, x0:x1]
    tex = _texture(tex_rng, y1 - y0, x1 - x0, colour)
    region[m] = tex[m]
    ys, xs = np.nonzero(m)
    box = [
        float(x0 + xs.min()),
        float(y0 + ys.min()),
        float(x0 + xs.max() + 1),
        float(y0 + ys.max() + 1),
    ]
    return box, int(m.sum())


def _clutter(img: np.ndarray, rng: np.random.Generator, count: int) -> None:
    h, w = img.shape[:2]
    pil = Image.fromarray(np.uint8(np.clip(img, 0, 255)))
    draw = ImageDraw.Draw(pil)
    for _ in range(count):
        colour = tuple(int(c) for c in _random_colour(rng))
        kind = rng.integers(3)
        if kind == 0:  # line
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            ang, length = rng.uniform(0, 2 * np.pi), rng.uniform(20, 120)
            draw.line(
                [(x, y), (x + length * math.cos(ang), y + length * math.sin(ang))],
                fill=colour,
                width=int(rng.integers(1, 4)),
            )
        elif kind == 1:  # irregular blob: a random star-convex polygon
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(5, 30)
            t = np.sort(rng.uniform(0, 2 * np.pi, 7))
            rr = r * rng.uniform(0.4, 1.0, 7)
            draw.polygon(
                [(cx + a * math.cos(b), cy + a * math.sin(b)) for a, b in zip(rr, t)], fill=colour
            )
        else:  # arc
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(8, 40)
            start = rng.uniform(0, 360)
            draw.arc(
                [cx - r, cy - r, cx + r, cy + r],
                start,
                start + rng.uniform(60, 200),
                fill=colour,
                width=int(rng.integers(1, 4)),
            )
    img[...] = np.asarray(pil, dtype=np.float32)


def render_image(
    seed: int, split: str, index: int, cfg: SynthConfig | None = None
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Render one image (uint8 HxWx3) and its objects ``[{"category": i, "bbox": xyxy, "area": a}]``."""
    cfg = cfg or SynthConfig()
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_KEYS[split], index]))
    h = int(rng.integers(cfg.min_side, cfg.max_side + 1))
    w = int(rng.integers(cfg.min_side, cfg.max_side + 1))
    img = _background(rng, h, w)
    n_clutter = int(rng.integers(cfg.clutter[0], cfg.clutter[1] + 1))
    behind = n_clutter // 2 + 1
    _clutter(img, rng, behind)
    objects: list[dict[str, Any]] = []
    n_obj = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    for _ in range(n_obj):
        cls = int(rng.integers(len(CLASSES)))
        for _attempt in range(20):
            size = math.exp(rng.uniform(math.log(cfg.min_size), math.log(cfg.max_size)))
            aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
            sx, sy = size / 2 * math.sqrt(aspect), size / 2 / math.sqrt(aspect)
            ang = (
                rng.uniform(0, 2 * np.pi) if CLASSES[cls] != "circle" or rng.random() < 0.5 else 0.0
            )
            outlines = _polygon(CLASSES[cls], rng)
            rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
            shaped = [(o * [sx, sy]) @ rot.T for o in outlines]
            lo, hi = shaped[0].min(0), shaped[0].max(0)
            bw, bh = hi - lo
            if bw + 2 >= w or bh + 2 >= h:
                continue
            cx = rng.uniform(-lo[0] + 1, w - hi[0] - 1)
            cy = rng.uniform(-lo[1] + 1, h - hi[1] - 1)
            box = [cx + lo[0], cy + lo[1], cx + hi[0], cy + hi[1]]
            placed = np.array([o["bbox"] for o in objects]).reshape(-1, 4)
            if objects and box_iou(np.array([box]), placed).max() > cfg.max_iou:
                continue
            hue = CLASS_HUES[cls] if rng.random() < cfg.class_colour_prob else None
            colour = _random_colour(rng, hue)
            painted = _paint(img, [s + np.array([cx, cy]) for s in shaped], rng, colour)
            if painted is not None:
                objects.append({"category": cls, "bbox": painted[0], "area": painted[1]})
            break
    _clutter(img, rng, n_clutter - behind)
    pil = Image.fromarray(np.uint8(np.clip(img, 0, 255)))
    if rng.random() < 0.3:
        pil = pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.0)))
    out = np.asarray(pil, dtype=np.float32)
    out = out + rng.normal(0, rng.uniform(*cfg.noise_sigma), out.shape)
    return np.uint8(np.clip(out, 0, 255)), objects


def generate(
    root: str | Path,
    *,
    train: int = 2000,
    val: int = 300,
    seed: int = 0,
    config: SynthConfig | None = None,
    progress: bool = False,
) -> Path:
    """Write the data set under ``root`` (``train/``, ``val/``, ``train.json``, ``val.json``).

    Returns ``root``. Existing files are overwritten (the result depends only on the arguments).
    """
    if train < 0 or val < 0 or train + val == 0:
        raise DamoError(
            f"cannot generate {train} train / {val} val images", "ask for at least one image"
        )
    cfg = config or SynthConfig()
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DamoError(f"cannot create data folder {root}: {exc.strerror}") from exc
    for split, count in (("train", train), ("val", val)):
        folder = root / split
        folder.mkdir(exist_ok=True)
        images, annotations = [], []
        it = range(count)
        if progress:
            from rich.progress import track

            it = track(it, description=f"generating {split}")
        for i in it:
            pixels, objects = render_image(seed, split, i, cfg)
            name = f"{i:06d}.jpg"
            Image.fromarray(pixels).save(folder / name, quality=cfg.jpeg_quality)
            images.append(
                {
                    "id": i + 1,
                    "file_name": name,
                    "height": pixels.shape[0],
                    "width": pixels.shape[1],
                }
            )
            for o in objects:
                x0, y0, x1, y1 = o["bbox"]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i + 1,
                        "category_id": o["category"] + 1,
                        "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                        "area": float(o["area"]),
                        "iscrowd": 0,
                    }
                )
        coco = {
            "info": {"description": "damo-plugins synthetic shapes", "seed": seed, "split": split},
            "images": images,
            "annotations": annotations,
            "categories": [
                {"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)
            ],
        }
        write_text(root / f"{split}.json", json.dumps(coco, separators=(",", ":")))
    return root


def split_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """(image folder, COCO JSON) of a split written by :func:`generate`."""
    root = Path(root)
    return root / split, root / f"{split}.json"
