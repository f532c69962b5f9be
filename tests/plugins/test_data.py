"""The generated data set, the COCO loader, NMS and the COCO evaluator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from damo_plugins.core.errors import DamoError
from damo_plugins.data.coco import CocoDetection, collate
from damo_plugins.data.evaluate import batched_nms, box_iou, coco_map, nms, postprocess
from damo_plugins.data.synthetic import CLASSES, generate


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synth") / "a", train=6, val=3, seed=7)


def test_generator_is_deterministic(synth, tmp_path):
    again = generate(tmp_path / "b", train=6, val=3, seed=7)
    other = generate(tmp_path / "c", train=2, val=1, seed=8)
    for split in ("train", "val"):
        assert (synth / f"{split}.json").read_bytes() == (again / f"{split}.json").read_bytes()
        for f in sorted((synth / split).iterdir()):
            assert f.read_bytes() == (again / split / f.name).read_bytes()
    # an image depends on (seed, split, index) only, not on how many were generated
    small = generate(tmp_path / "d", train=2, val=1, seed=7)
    assert (small / "train" / "000001.jpg").read_bytes() == (
        synth / "train" / "000001.jpg"
    ).read_bytes()
    assert (other / "train" / "000000.jpg").read_bytes() != (
        synth / "train" / "000000.jpg"
    ).read_bytes()


def test_coco_json_is_valid(synth):
    from pycocotools.coco import COCO

    coco = COCO(str(synth / "train.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    assert len(coco.getImgIds()) == 6
    assert len(coco.getAnnIds()) >= 6
    for img in coco.loadImgs(coco.getImgIds()):
        assert 256 <= img["width"] <= 320 and 256 <= img["height"] <= 320
        assert (synth / "train" / img["file_name"]).is_file()
        for a in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            x, y, w, h = a["bbox"]
            assert w > 1 and h > 1 and x >= 0 and y >= 0
            assert x + w <= img["width"] + 0.01 and y + h <= img["height"] + 0.01
            assert 0 < a["area"] <= w * h + 1


def test_loader_preprocessing_and_augmentation(synth):
    plain = CocoDetection(synth / "train", synth / "train.json", 128)
    img, boxes, info = plain[0]
    assert img.shape == (3, 128, 128) and img.dtype == torch.float32
    assert 0 <= float(img.min()) and float(img.max()) <= 255 and float(img.max()) > 50
    h, w = info["size"]
    raw = json.loads((synth / "train.json").read_text())
    gt = [a for a in raw["annotations"] if a["image_id"] == info["image_id"]]
    assert len(boxes) == len(gt)
    assert boxes[0, 1] == pytest.approx(gt[0]["bbox"][0] * info["scale"], abs=1e-3)
    # bottom/right padding is zero, image content at the top-left
    if w > h:
        assert float(img[:, -1, :].abs().max()) == 0.0
    aug = CocoDetection(
        synth / "train", synth / "train.json", 128, augment=True, flip_prob=1.0, scale_jitter=(1, 1)
    )
    img2, boxes2, _ = aug[0]
    flipped = torch.flip(img2, dims=[2])
    assert (
        torch.allclose(
            flipped[:, :, 128 - round(w * info["scale"]) :][:, :5],
            img[:, :, : round(w * info["scale"])][:, :5],
            atol=1.0,
        )
        or len(boxes2) > 0
    )
    assert torch.allclose(boxes2[:, 1], info["scale"] * w - boxes[:, 3], atol=1e-3)
    images, targets, _ = collate([aug[i] for i in range(3)])
    assert images.shape == (3, 3, 128, 128) and len(targets) == 3
    for t in targets:
        assert bool((t[:, 1:] >= 0).all() and (t[:, 1:] <= 128).all())


def test_loader_reports_bad_paths(tmp_path):
    with pytest.raises(DamoError, match="image folder"):
        CocoDetection(tmp_path / "nope", tmp_path / "x.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DamoError, match="JSON"):
        CocoDetection(tmp_path, tmp_path / "x.json")


def _reference_nms(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    order = list(np.argsort(-scores, kind="stable"))
    keep = []
    while order:
        i = order.pop(0)
        keep.append(i)
        order = [
            j
            for j in order
            if box_iou(torch.tensor(boxes[[i]]), torch.tensor(boxes[[j]]))[0, 0] <= thr
        ]
    return keep


def test_nms_matches_reference_greedy():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (60, 2))
    wh = rng.uniform(5, 30, (60, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.uniform(0, 1, 60).astype(np.float32)
    for thr in (0.3, 0.5, 0.7):
        got = nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr).tolist()
        assert got == _reference_nms(boxes, scores, thr)
    # per-class: identical boxes of different classes both survive
    b = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10.0]])
    keep = batched_nms(b, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 1, 0]), 0.5)
    assert keep.tolist() == [0, 1]
    assert nms(torch.empty(0, 4), torch.empty(0), 0.5).numel() == 0


def test_postprocess_multiclass():
    scores = torch.zeros(1, 3, 2)
    scores[0, 0, 0], scores[0, 1, 0], scores[0, 2, 1] = 0.9, 0.8, 0.6
    boxes = torch.tensor([[[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10.0]]])
    (res,) = postprocess(scores, boxes, conf=0.05, iou=0.5)
    assert res["labels"].tolist() == [0, 1] and res["scores"].tolist() == pytest.approx([0.9, 0.6])
    with pytest.raises(DamoError, match="expected scores"):
        postprocess(torch.zeros(3, 2), boxes)


def _gt(boxes):
    return {
        "images": [
            {"id": i + 1, "width": 100, "height": 100, "file_name": f"{i}.jpg"}
            for i in range(len(boxes))
        ],
        "annotations": [
            {
                "id": i + 1,
                "image_id": i + 1,
                "category_id": 1,
                "bbox": b,
                "area": b[2] * b[3],
                "iscrowd": 0,
            }
            for i, b in enumerate(boxes)
        ],
        "categories": [{"id": 1, "name": "a"}],
    }


def test_evaluator_perfect_on_ground_truth(synth):
    raw = json.loads((synth / "val.json").read_text())
    dets = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
        }
        for a in raw["annotations"]
    ]
    m = coco_map(synth / "val.json", dets)
    assert m["mAP"] == pytest.approx(1.0) and m["mAP50"] == pytest.approx(1.0)
    assert coco_map(synth / "val.json", [])["mAP"] == 0.0


def test_evaluator_known_value_on_perturbed_set():
    gt = _gt([[10, 10, 30, 30], [10, 10, 30, 30]])  # xywh
    # image 1 exact; image 2 shifted by d along x so that IoU = (30-d)/(30+d) = 0.625
    d = 30 * 0.375 / 1.625
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.9},
        {"image_id": 2, "category_id": 1, "bbox": [10 + d, 10, 30, 30], "score": 0.8},
    ]
    m = coco_map(gt, dets)
    # thresholds .50/.55/.60 both match (AP 1); .65-.95 only the first: recall 0.5 at precision
    # 1 -> 51 of COCO's 101 recall points.
    expected = (3 * 1.0 + 7 * 51 / 101) / 10
    assert m["mAP"] == pytest.approx(expected, abs=1e-6)
    assert m["mAP50"] == pytest.approx(1.0)
