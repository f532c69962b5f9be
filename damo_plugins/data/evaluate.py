"""COCO mAP of a detector, with a torch-only NMS.

The metric itself is pycocotools' ``COCOeval`` (the reference implementation; writing our own
COCO evaluation would be a source of silent disagreements). NMS is ours, in plain torch,
because torchvision cannot be installed beside the CPU torch wheel here.

Detector outputs follow DAMO-YOLO's inference head: per image ``scores [A, C]`` (sigmoid
class scores) and ``boxes [A, 4]`` (``x1, y1, x2, y2`` in input pixels). Post-processing is
DAMO's multi-class NMS: every (anchor, class) pair above ``conf`` is a candidate, NMS runs per
class, and the best ``max_det`` survive.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from damo_plugins.core.errors import DamoError
from damo_plugins.lib.boxes import box_iou

if TYPE_CHECKING:  # pragma: no cover
    from damo_plugins.core.artifact import ModelArtifact


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS: indices of the kept boxes, by decreasing score.

    A box is dropped when its IoU with a higher-scoring kept box is *greater* than the
    threshold (the same convention as torchvision). Exact greedy order; the IoU matrix is
    computed once, so it suits the up-to-a-few-thousand candidates of evaluation.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    order = torch.argsort(scores, descending=True, stable=True)
    iou = box_iou(boxes[order], boxes[order])
    n = order.numel()
    suppressed = torch.zeros(n, dtype=torch.bool)
    keep = []
    above = iou > iou_threshold
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= above[i]
    return order[torch.tensor(keep, dtype=torch.long)]


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """NMS within each label: boxes of different labels never suppress each other.

    Boxes are shifted by ``label * (max coordinate + 1)`` so groups cannot overlap, then one
    NMS runs over all of them.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    shift = labels.to(boxes.dtype) * (boxes.max() + 1)
    return nms(boxes + shift[:, None], scores, iou_threshold)


def postprocess(
    scores: torch.Tensor,
    boxes: torch.Tensor,
    *,
    conf: float = 0.05,
    iou: float = 0.7,
    max_det: int = 100,
    pre_nms: int = 1000,
) -> list[dict[str, torch.Tensor]]:
    """Multi-class NMS on a batch: ``scores [N, A, C]``, ``boxes [N, A, 4]`` -> per image
    ``{"boxes": [k, 4], "scores": [k], "labels": [k]}``."""
    if (
        scores.dim() != 3
        or boxes.dim() != 3
        or boxes.shape[-1] != 4
        or scores.shape[:2] != boxes.shape[:2]
    ):
        raise DamoError(
            f"detector outputs have shapes {tuple(scores.shape)} and {tuple(boxes.shape)}",
            "expected scores [N, A, C] and boxes [N, A, 4]",
        )
    out = []
    for s, b in zip(scores.float(), boxes.float()):
        num_classes = s.shape[1]
        flat = s.reshape(-1)
        cand = torch.nonzero(flat > conf).squeeze(1)
        if cand.numel() > pre_nms:
            cand = cand[torch.topk(flat[cand], pre_nms).indices]
        anchor, label = cand // num_classes, cand % num_classes
        cb, cs = b[anchor], flat[cand]
        keep = batched_nms(cb, cs, label, iou)[:max_det]
        out.append({"boxes": cb[keep], "scores": cs[keep], "labels": label[keep]})
    return out


def _quiet_coco(annotations: str | Path | Mapping[str, Any]) -> Any:
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(annotations, Mapping):
            coco = COCO()
            coco.dataset = dict(annotations)
            coco.createIndex()
            return coco
        return COCO(str(annotations))


def coco_map(
    annotations: str | Path | Mapping[str, Any] | Any,
    detections: Sequence[Mapping[str, Any]],
    image_ids: Iterable[int] | None = None,
) -> dict[str, float]:
    """COCO box metrics of ``detections`` (``[{"image_id", "category_id", "bbox" xywh, "score"}]``).

    ``annotations`` is a COCO JSON path, its parsed dict, or a ``pycocotools`` ``COCO``.
    ``image_ids`` restricts the evaluation (default: every image of the annotations).
    Returns ``mAP`` (@[.5:.95]), ``mAP50``, ``mAP75`` and the small/medium/large APs.
    """
    from pycocotools.cocoeval import COCOeval

    gt = annotations if hasattr(annotations, "getImgIds") else _quiet_coco(annotations)
    keys = ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large")
    if not detections:
        return dict.fromkeys(keys, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes([dict(d) for d in detections])
        ev = COCOeval(gt, dt, "bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # COCOeval reports -1 where a category of area has no ground truth; report 0 instead.
    return {k: max(float(v), 0.0) for k, v in zip(keys, ev.stats[:6])}


def to_coco_detections(
    results: Sequence[Mapping[str, torch.Tensor]],
    infos: Sequence[Mapping[str, Any]],
    cat_ids: Sequence[int],
) -> list[dict[str, Any]]:
    """Map per-image results in canvas pixels back to original-image COCO detections."""
    dets = []
    for res, info in zip(results, infos):
        ox, oy = info.get("offset", (0, 0))
        b = (res["boxes"] - torch.tensor([ox, oy, ox, oy], dtype=res["boxes"].dtype)) / float(
            info["scale"]
        )
        h, w = info["size"]
        b[:, 0::2] = b[:, 0::2].clamp(0, w)
        b[:, 1::2] = b[:, 1::2].clamp(0, h)
        for box, score, label in zip(b.tolist(), res["scores"].tolist(), res["labels"].tolist()):
            x0, y0, x1, y1 = box
            dets.append(
                {
                    "image_id": int(info["image_id"]),
                    "category_id": int(cat_ids[int(label)]),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": float(score),
                }
            )
    return dets


def split_outputs(out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [N,A,C], boxes [N,A,4]) from a detector's inference output (a pair, any order)."""
    if isinstance(out, Mapping):
        out = list(out.values())
    if not isinstance(out, (list, tuple)) or len(out) != 2:
        raise DamoError(
            "the model does not return (scores, boxes)", "evaluate a DAMO-YOLO detector"
        )
    a, b = out
    if a.shape[-1] == 4 and b.shape[-1] != 4:
        a, b = b, a
    return a, b


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: Any,
    *,
    batch_size: int = 8,
    conf: float = 0.05,
    iou: float = 0.7,
    max_det: int = 100,
    limit: int | None = None,
) -> dict[str, float]:
    """COCO mAP of ``model`` (in eval mode) on a :class:`~damo_plugins.data.coco.CocoDetection`.

    ``limit`` evaluates only the first ``limit`` images (quick checks during training).
    """
    from damo_plugins.data.coco import collate

    was_training = model.training
    model.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    dets: list[dict[str, Any]] = []
    ids: list[int] = []
    try:
        for start in range(0, n, batch_size):
            images, _, infos = collate(
                [dataset[i] for i in range(start, min(n, start + batch_size))]
            )
            scores, boxes = split_outputs(model(images))
            results = postprocess(scores, boxes, conf=conf, iou=iou, max_det=max_det)
            dets += to_coco_detections(results, infos, dataset.cat_ids)
            ids += [int(i["image_id"]) for i in infos]
    finally:
        model.train(was_training)
    return coco_map(dataset.annotations, dets, image_ids=ids)


def detection_map(
    outputs: Iterable[Sequence[Any]],
    infos: Sequence[Mapping[str, Any]],
    annotations: str | Path | Mapping[str, Any] | Any,
    cat_ids: Sequence[int],
    *,
    conf: float = 0.05,
    iou: float = 0.7,
    max_det: int = 100,
) -> dict[str, float]:
    """COCO metrics of raw detector outputs computed elsewhere (ONNX Runtime, OpenVINO, ...).

    ``outputs[i]`` is one model run on the image described by ``infos[i]`` (as returned by
    :class:`~damo_plugins.data.coco.CocoDetection`): a ``(scores, boxes)`` pair of arrays or
    tensors, batch 1. Post-processing and scoring are exactly :func:`evaluate`'s, so a
    quantizer's accuracy control and our ``evaluate`` step agree on what "mAP" means.
    """
    import numpy as np

    dets: list[dict[str, Any]] = []
    ids: list[int] = []
    for out, info in zip(outputs, infos):
        scores, boxes = split_outputs([torch.as_tensor(np.asarray(o)) for o in out])
        res = postprocess(scores, boxes, conf=conf, iou=iou, max_det=max_det)
        dets += to_coco_detections(res, [info], cat_ids)
        ids.append(int(info["image_id"]))
    return coco_map(annotations, dets, image_ids=ids)


# ------------------------------------------------- artifacts (any format) on a data set
def generated_data(images: int, seed: int) -> Path:
    """The synthetic validation set (deterministic), generated once into the user's cache."""
    from damo_plugins.data.sources import synthetic_root

    return synthetic_root(0, images, seed)


#: names of the generated data set the embedded model was trained on
SYNTHETIC_NAMES = ("synthetic", "generated")


def check_classes(predicted: int, dataset: Any) -> None:
    """A clear error when a detector's classes and a data set's categories differ in number:
    mAP would silently compare the wrong classes (0.007 instead of an error)."""
    cats = len(dataset.cat_ids)
    if predicted != cats:
        source = getattr(dataset, "annotations", None) or "the data set"
        raise DamoError(
            f"the model predicts {predicted} classes but {source} has {cats} categories",
            "evaluate on data with the model's classes (or a model trained on this data)",
        )


def dataset_for(cfg: Any, img_size: int) -> Any:
    from damo_plugins.data.coco import CocoDetection

    synthetic = cfg.data in SYNTHETIC_NAMES
    root = generated_data(cfg.images, cfg.seed) if synthetic else Path(cfg.data)
    images, annotations = root / cfg.split, root / f"{cfg.split}.json"
    if not annotations.is_file():
        raise DamoError(
            f"no annotations at {annotations}", "give data: DIR with DIR/val.json, or 'generated'"
        )
    return CocoDetection(images, annotations, img_size, augment=False)


def evaluate_artifact(
    artifact: ModelArtifact, dataset: Any, cfg: Any, manager: Any = None
) -> dict[str, float]:
    """mAP of a torch/ONNX/OpenVINO detector artifact (one image per inference)."""
    import torch

    from damo_plugins.core.progress import track
    from damo_plugins.data.evaluate import coco_map, postprocess, split_outputs, to_coco_detections

    n = len(dataset) if cfg.limit is None else min(cfg.limit, len(dataset))
    dets: list[dict[str, Any]] = []
    ids: list[int] = []
    for i in track(range(n), f"evaluating {artifact.format} model", n, unit="images"):
        image, _, info = dataset[i]
        outs = artifact.run([image[None].numpy().astype(np.float32)], manager)
        scores, boxes = split_outputs([torch.from_numpy(np.asarray(o)) for o in outs])
        if i == 0:
            check_classes(int(scores.shape[-1]), dataset)
        res = postprocess(scores, boxes, conf=cfg.conf, iou=cfg.iou)
        dets += to_coco_detections(res, [info], dataset.cat_ids)
        ids.append(int(info["image_id"]))
    return coco_map(dataset.annotations, dets, image_ids=ids)
