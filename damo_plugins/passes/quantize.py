"""``quantize``: INT8 post-training quantization through a backend adapter, checked against FP32.

The work is done by the adapters (``nncf``, ``inc``, ``onnxruntime``): each hands the model
to its backend's own quantizer. This module holds what they share:

* **the detector head policy.** Quantizing DAMO-YOLO's decode (sigmoid scores, softmax over
  the distance bins, integral, x stride, distance -> box) wrecks its outputs: scores collapse
  to a few levels and boxes jump by whole bins times the stride. :func:`walk_decode` finds
  that sub-graph *structurally* — from each model output back through the element-wise and
  shape ops to the last convolutions — so it works on user exports with arbitrary node
  names, and each adapter keeps what it finds in floating point (NNCF ``ignored_scope``,
  ONNX Runtime ``nodes_to_exclude``, INC observers). The convolutions themselves stay INT8.
* **the INT8 check**: cosine similarity of every output on held-out inputs and, for
  detectors, agreement of the top detections; :class:`QuantizePass` verifies with both.
* **the accuracy-control metric** (``max_drop``): with labelled validation data (a COCO
  folder or JSON, :func:`labelled_validation`) and a detector, COCO mAP@[.5:.95] through
  our evaluator (:func:`damo_plugins.data.evaluate.detection_map`), so ``max_drop`` is an
  absolute mAP drop; with unlabelled data, agreement with the FP32 model (:func:`fidelity`).
  The report names which (``accuracy_metric``) with the FP32 and INT8 values.
* the ``damo-opt quantize`` command.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from damo_plugins.errors import DamoError
from damo_plugins.hookspecs import hookimpl
from damo_plugins.passes.base import Pass, PassConfig, PassContext
from damo_plugins.verify import Verification, compare_outputs

if TYPE_CHECKING:  # pragma: no cover
    from damo_plugins.artifact import ModelArtifact
    from damo_plugins.manager import PluginManager

#: default target format per adapter (where its INT8 model runs fastest here)
DEFAULT_TARGET = {"nncf": "openvino", "inc": "openvino", "onnxruntime": "onnx"}

# ------------------------------------------------------------------------ decode sub-graph
#: what a node is to the walk (see :func:`walk_decode`)
STOP, CONST, INPUT, SHAPE, SIGNATURE, OP = "stop", "const", "input", "shape", "signature", "op"

#: ops that only a decode/post-processing tail has right before the outputs
SIGNATURE_OPS = frozenset({"Sigmoid", "Softmax", "LogSoftmax"})


def walk_decode(
    outputs: Iterable[Hashable],
    inputs_of: Callable[[Any], Iterable[Hashable]],
    kind_of: Callable[[Any], str],
) -> set[Hashable]:
    """Nodes between the model outputs and the last convolutions that form a decode tail.

    Format-neutral: ``outputs`` are the nodes producing the model outputs, ``inputs_of(n)``
    the nodes feeding ``n`` and ``kind_of(n)`` classifies a node as

    * ``stop``: a convolution (or a learned linear layer) — the boundary, stays quantized;
    * ``const``: a constant/initializer — skipped;
    * ``input``: a graph input — reaching one means this output is not a conv head's tail;
    * ``shape``: reads only a tensor's shape — part of the tail, not walked through;
    * ``signature``: sigmoid/softmax — part of the tail and the mark of a decode;
    * ``op``: anything else — part of the tail if the output's walk qualifies.

    An output contributes its walk only if it stays behind convolutions and contains a
    signature op: a classifier's ``Gemm`` logits or a feature map do not qualify.
    """
    found: set[Hashable] = set()
    for out in outputs:
        seen: set[Hashable] = set()
        stack = [out]
        qualifies, signature = True, False
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            kind = kind_of(node)
            if kind in (STOP, CONST):
                continue
            if kind == INPUT:
                qualifies = False
                break
            seen.add(node)
            if kind == SIGNATURE:
                signature = True
            if kind != SHAPE:
                stack.extend(inputs_of(node))
        if qualifies and signature:
            found |= seen
    return found


def _onnx_kind(node: Any, initializers: dict[str, Any]) -> str:
    op = node.op_type
    if op in ("Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "Gemm"):
        return STOP
    if op == "MatMul":
        # A learned linear layer (2-D weight) is a boundary; the integral's bin vector is not.
        for name in node.input:
            init = initializers.get(name)
            if init is not None and len(init.dims) == 2 and min(init.dims) > 1:
                return STOP
        return OP
    if op == "Constant":
        return CONST
    if op == "Shape":
        return SHAPE
    if op in SIGNATURE_OPS:
        return SIGNATURE
    return OP


def onnx_decode_nodes(model: Any) -> list[str]:
    """Names of the ONNX nodes forming a detector's decode tail (empty if there is none).

    Nodes need names (see :func:`name_onnx_nodes`); the list is in graph order.
    """
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    producer: dict[str, Any] = {}
    for node in graph.node:
        for out in node.output:
            producer[out] = node
    inputs = {i.name for i in graph.input} - set(initializers)
    by_id = {id(n): n for n in graph.node}
    INPUT_NODE = "<input>"

    def inputs_of(nid: Any) -> list[Any]:
        res = []
        for name in by_id[nid].input:
            if name in producer:
                res.append(id(producer[name]))
            elif name in inputs:
                res.append(INPUT_NODE)
        return res

    def kind_of(nid: Any) -> str:
        if nid == INPUT_NODE:
            return INPUT
        return _onnx_kind(by_id[nid], initializers)

    outs = [id(producer[o.name]) for o in graph.output if o.name in producer]
    found = walk_decode(outs, inputs_of, kind_of)
    return [n.name for n in graph.node if id(n) in found]


def name_onnx_nodes(model: Any) -> Any:
    """Give every unnamed ONNX node a unique name (backends address nodes by name)."""
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)
    return model


# --------------------------------------------------------------------------- INT8 check
def detector_outputs(
    outputs: Sequence[np.ndarray], names: Sequence[str] = ()
) -> tuple[int, int] | None:
    """Indices of (scores ``[N, A, C]``, boxes ``[N, A, 4]``) if the outputs look like a detector."""
    if "scores" in names and "boxes" in names:
        s, b = list(names).index("scores"), list(names).index("boxes")
        if s < len(outputs) and b < len(outputs):
            return s, b
    three = [i for i, o in enumerate(outputs) if np.ndim(o) == 3]
    for b in three:
        if outputs[b].shape[-1] != 4:
            continue
        for s in three:
            if s != b and outputs[s].shape[:2] == outputs[b].shape[:2]:
                return s, b
    return None


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)

    def area(b: np.ndarray) -> np.ndarray:
        return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)

    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-9)


def top_detection_agreement(
    ref_scores: np.ndarray,
    ref_boxes: np.ndarray,
    scores: np.ndarray,
    boxes: np.ndarray,
    *,
    k: int = 10,
    iou: float = 0.5,
) -> float:
    """Share of the reference's top-``k`` detections that the candidate also makes.

    Per image, the reference's ``k`` best (anchor, class) pairs are matched against the
    candidate's ``2k`` best: same class and IoU >= ``iou``. 1.0 means the INT8 model finds
    the same top objects as FP32; a collapsed head scores near 0.
    """
    hits, total = 0, 0
    for rs, rb, cs, cb in zip(ref_scores, ref_boxes, scores, boxes):
        rs, cs = rs.reshape(rs.shape[0], -1), cs.reshape(cs.shape[0], -1)
        n_cls = rs.shape[1]
        kk = min(k, rs.size)
        ref_top = np.argsort(rs.ravel())[::-1][:kk]
        cand_top = np.argsort(cs.ravel())[::-1][: min(2 * kk, cs.size)]
        c_anchor, c_cls = cand_top // n_cls, cand_top % n_cls
        for flat in ref_top:
            a, c = divmod(int(flat), n_cls)
            same = c_cls == c
            total += 1
            if same.any() and float(_iou(rb[a], cb[c_anchor[same]]).max()) >= iou:
                hits += 1
    return hits / total if total else 1.0


def fidelity(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], names: Sequence[str] = ()
) -> float:
    """One number in [0, 1] for "does the candidate compute what the reference does".

    Detectors: top-detection agreement; other models: the lowest output cosine similarity.
    Used as the default metric of accuracy-controlled quantization (the FP32 model scores
    exactly 1.0, so ``max_drop`` reads as "at most this much disagreement").
    """
    det = detector_outputs(reference, names)
    if det is not None:
        s, b = det
        return top_detection_agreement(reference[s], reference[b], candidate[s], candidate[b])
    return max(0.0, compare_outputs(reference, candidate)["cosine"])


def compare_int8(
    references: Sequence[Sequence[np.ndarray]],
    candidates: Sequence[Sequence[np.ndarray]],
    names: Sequence[str] = (),
) -> dict[str, Any]:
    """Cosine similarity (min and mean over samples) and, for detectors, top-detection agreement."""
    cos, rel, agree = [], [], []
    det = detector_outputs(references[0], names) if references else None
    for ref, out in zip(references, candidates):
        m = compare_outputs(ref, out)
        cos.append(m["cosine"])
        rel.append(m["max_rel"])
        if det is not None:
            s, b = det
            agree.append(top_detection_agreement(ref[s], ref[b], out[s], out[b]))
    res: dict[str, Any] = {
        "samples": len(cos),
        "cosine_min": float(min(cos)) if cos else None,
        "cosine_mean": float(np.mean(cos)) if cos else None,
        "max_rel": float(max(rel)) if rel else None,
        "detector": det is not None,
    }
    if det is not None:
        res["top_detection_agreement"] = float(np.mean(agree))
    return res


def runner(
    artifact: ModelArtifact, manager: PluginManager | None = None
) -> Callable[[Sequence[np.ndarray]], list[np.ndarray]]:
    """A function running ``artifact`` repeatedly without rebuilding a session each time."""
    if artifact.format == "onnx":
        from damo_plugins.onnx_utils import ort_session

        sess = ort_session(artifact.model)
        names = [i.name for i in sess.get_inputs()]
        return lambda feeds: list(sess.run(None, dict(zip(names, feeds))))
    if artifact.format == "openvino":
        from damo_plugins.manager import get_manager

        adapter = (manager or get_manager()).adapter_for_format("openvino")
        compiled = adapter.compile(artifact, "CPU")
        outs = list(compiled.outputs)

        def run_ov(feeds: Sequence[np.ndarray]) -> list[np.ndarray]:
            res = compiled(list(feeds))
            return [np.asarray(res[o]) for o in outs]

        return run_ov
    return lambda feeds: artifact.run(feeds, manager)


def as_feeds(item: Any) -> list[np.ndarray]:
    """A calibration item (one array, or one array per model input) as a list of feeds."""
    if isinstance(item, np.ndarray):
        return [item]
    return [np.asarray(x) for x in item]


# ------------------------------------------------------------- labelled validation (mAP)
#: accuracy-control metric names, as reported in the quantization metrics
MAP, AGREEMENT = "mAP", "fp32-agreement"


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
    spec: Any, input_shape: Sequence[Any] | None, size: int
) -> LabelledDetections | None:
    """The first ``size`` images of a COCO validation source, preprocessed for the model.

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
    n = min(size, len(dataset))
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


# ---------------------------------------------------------------------------------- pass
class IgnoredScope(BaseModel):
    """What to keep in floating point besides (or, with keep_head_fp false, instead of) the head."""

    model_config = ConfigDict(extra="forbid")
    names: list[str] = Field(default_factory=list, description="node names (ONNX/OpenVINO)")
    types: list[str] = Field(default_factory=list, description="op types, e.g. Softmax")
    patterns: list[str] = Field(
        default_factory=list, description="regular expressions on node names"
    )


class QuantizeConfig(PassConfig):
    adapter: str = Field("nncf", description="nncf | inc | onnxruntime (or a third-party adapter)")
    target: Literal["openvino", "onnx"] | None = Field(
        None, description="output format (default per adapter)"
    )
    calibration: Any = Field(
        "generated", description="{images: DIR, size: N} | {numpy: FILE} | {generated: N} | path"
    )
    subset_size: int = Field(300, ge=1, description="calibration samples to use")
    mode: Literal["int8", "weights"] = Field(
        "int8", description="int8: weights+activations; weights: weight-only (NNCF)"
    )
    preset: Literal["performance", "mixed"] = "performance"
    fast_bias_correction: bool = True
    target_device: Literal["ANY", "CPU", "GPU", "NPU", "CPU_SPR"] = Field(
        "ANY", description="NNCF target device"
    )
    per_channel: bool = Field(True, description="per-channel weight scales (ONNX Runtime)")
    calibrate_method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="ONNX Runtime"
    )
    keep_head_fp: bool = Field(
        True, description="keep the detector decode sub-graph in floating point"
    )
    ignored_scope: IgnoredScope | None = None
    max_drop: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="accuracy control: largest allowed drop (absolute mAP with labelled val)",
    )
    val: Any = Field(
        None,
        description="validation data for max_drop and the INT8 check: labelled (DIR with "
        "val/ + val.json, a COCO .json, {coco: ...}) -> mAP; images/.npy/generated -> "
        "agreement with FP32",
    )
    val_size: int = Field(16, ge=1, description="validation samples for accuracy control")
    torch_backend: bool = Field(
        False,
        description="NNCF: quantize the nn.Module on NNCF's torch path (builds a C++ "
        "extension on first use), then convert to OpenVINO",
    )
    holdout: int = Field(8, ge=1, description="held-out samples compared INT8 vs FP32")
    min_cosine: float = Field(
        0.97, ge=0, le=1, description="verify: lowest output cosine similarity"
    )
    min_agreement: float = Field(
        0.5, ge=0, le=1, description="verify: lowest top-detection agreement"
    )


class QuantizePass(Pass):
    """INT8 quantization through an adapter; verified by cosine and top-detection agreement."""

    name = "quantize"
    accepts = ("torch", "onnx", "openvino")
    produces = None
    Config = QuantizeConfig
    description = "INT8 post-training quantization (NNCF / INC / ONNX Runtime), head kept in FP"

    @classmethod
    def output_format(cls, config: PassConfig, input_format: str) -> str:
        cfg: QuantizeConfig = config  # type: ignore[assignment]
        return cfg.target or DEFAULT_TARGET.get(cfg.adapter, input_format)

    def _data(self, artifact: ModelArtifact, ctx: PassContext) -> tuple[Any, Any, str]:
        """Calibration subset, held-out set and a description of where the held-out came from."""
        from damo_plugins.data.calibration import generated_images, resolve_calibration

        cfg: QuantizeConfig = self.config  # type: ignore[assignment]
        shape = artifact.inputs[0].concrete() if artifact.inputs else None
        calib = resolve_calibration(cfg.calibration, shape, ctx.manager, seed=ctx.seed)
        used = calib.subset(0, cfg.subset_size)
        labelled = (
            labelled_validation(cfg.val, shape, cfg.val_size) if cfg.val is not None else None
        )
        if labelled is not None:
            held = labelled
            origin = f"labelled validation data {labelled.source}"
        elif cfg.val is not None:
            held = resolve_calibration(cfg.val, shape, ctx.manager, seed=ctx.seed + 1)
            origin = "validation data"
        elif len(calib) > len(used):
            held = calib.subset(len(used), len(used) + cfg.holdout)
            origin = "calibration samples not used for calibration"
        else:
            held = generated_images(cfg.holdout, input_shape=shape, seed=ctx.seed + 10_000)
            origin = "generated images (the calibration set had no spare samples)"
        return used, held, origin

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        cfg: QuantizeConfig = self.config  # type: ignore[assignment]
        if not artifact.inputs:
            raise DamoError(
                "cannot quantize: the model's input shape is unknown",
                "give input_shape / --input-shape",
            )
        adapter = ctx.manager.get_adapter(cfg.adapter)
        calib, held, origin = self._data(artifact, ctx)
        if calib.name.startswith("generated"):
            ctx.log(
                "  note: calibrating on generated images — fine for a smoke run, not for deployment"
            )
        options = cfg.model_dump(
            exclude={"adapter", "calibration", "val", "holdout", "min_cosine", "min_agreement"}
        )
        options["target"] = self.output_format(cfg, artifact.format)
        options["ignored_scope"] = cfg.ignored_scope.model_dump() if cfg.ignored_scope else None
        if isinstance(held, LabelledDetections):
            held = self._check_labelled(held, artifact, ctx)
        validation = None
        if cfg.max_drop is not None:
            if isinstance(held, LabelledDetections):
                validation = held
                ctx.log(
                    f"  accuracy control: mAP@[.5:.95] on {held.source}, max drop {cfg.max_drop}"
                )
            else:
                validation = held.subset(0, cfg.val_size) if cfg.val is not None else held
                ctx.log(
                    f"  accuracy control: agreement with FP32 (no labels), max drop {cfg.max_drop}"
                )
        ctx.log(
            f"  quantizing with {cfg.adapter} -> {options['target']} on {len(calib)} calibration samples"
        )
        out = adapter.quantize(artifact, calib, validation=validation, seed=ctx.seed, **options)
        ctx.extra["quantization"] = dict(out.meta.get("quantization", {}))
        self._held = held
        self._origin = origin
        return out

    @staticmethod
    def _check_labelled(held: LabelledDetections, artifact: ModelArtifact, ctx: PassContext) -> Any:
        """Labelled data for a detector; for any other model, just its images (with a note)."""
        outputs = runner(artifact, ctx.manager)([held[0]])
        if detector_outputs([np.asarray(o) for o in outputs]) is None:
            ctx.log(
                "  note: the model is not a detector (no scores/boxes outputs): its labelled "
                "validation images are used unlabelled, scored by agreement with FP32"
            )
            from damo_plugins.data.calibration import CalibrationSet

            return CalibrationSet(f"images of {held.source}", len(held), held.images.__getitem__)
        held.check_outputs(outputs)
        return held

    def verify(self, before: ModelArtifact, after: ModelArtifact, ctx: PassContext) -> Verification:
        cfg: QuantizeConfig = self.config  # type: ignore[assignment]
        held = getattr(self, "_held", None)
        origin = getattr(self, "_origin", "")
        if held is None:
            _, held, origin = self._data(before, ctx)
        run_ref, run_q = runner(before, ctx.manager), runner(after, ctx.manager)
        refs, outs = [], []
        for item in held:
            feeds = as_feeds(item)
            refs.append(run_ref(feeds))
            outs.append(run_q(feeds))
        names = [t.name for t in after.outputs]
        m = compare_int8(refs, outs, names)
        m.update(held_out=origin, min_cosine=cfg.min_cosine)
        ok = m["cosine_min"] is not None and m["cosine_min"] >= cfg.min_cosine
        msg = f"INT8 vs FP32 on {m['samples']} held-out inputs: cosine min {m['cosine_min']:.4f} (>= {cfg.min_cosine})"
        if m["detector"]:
            m["min_agreement"] = cfg.min_agreement
            ok = ok and m["top_detection_agreement"] >= cfg.min_agreement
            msg += f", top-detection agreement {m['top_detection_agreement']:.2f} (>= {cfg.min_agreement})"
        if isinstance(held, LabelledDetections) and m["detector"]:
            # mAP of the deployed models themselves (the adapter measured in its own runtime).
            fp32, int8 = held.score_outputs(refs), held.score_outputs(outs)
            m.update(
                mAP_fp32=round(fp32, 4), mAP_int8=round(int8, 4), mAP_drop=round(fp32 - int8, 4)
            )
            msg += f", mAP@[.5:.95] {fp32:.4f} -> {int8:.4f}"
            if cfg.max_drop is not None:
                ok = ok and fp32 - int8 <= cfg.max_drop
                msg += f" (drop {fp32 - int8:.4f} <= {cfg.max_drop})"
        ctx.extra.setdefault("int8_vs_fp32", m)
        return Verification(ok, m, msg)


@hookimpl
def damo_passes() -> list[type[Pass]]:
    return [QuantizePass]


# ----------------------------------------------------------------------------------- CLI
def cmd_quantize(args: argparse.Namespace) -> int:
    from damo_plugins.cli import _log
    from damo_plugins.manager import get_manager
    from damo_plugins.pipeline import run

    step: dict[str, Any] = {
        "adapter": args.adapter,
        "calibration": args.calib,
        "subset_size": args.subset,
    }
    if args.target:
        step["target"] = args.target
    if args.max_drop is not None:
        if args.val is None:
            raise DamoError(
                "--max-drop needs --val SRC (validation data)",
                "e.g. --val DATA (DATA/val/ + DATA/val.json: mAP) or --val images/ (agreement with FP32)",
            )
        step["max_drop"] = args.max_drop
    if args.val is not None:
        step["val"] = args.val
    if args.mode != "int8":
        step["mode"] = args.mode
    if args.no_keep_head:
        step["keep_head_fp"] = False
    model: str = args.model
    if Path(model).exists():
        model = str(Path(model).resolve())
    kwargs: dict[str, Any] = {}
    for item in args.model_arg:
        key, _, value = item.partition("=")
        if not _:
            raise DamoError(f"--model-arg '{item}' is not KEY=VALUE")
        import json

        try:
            kwargs[key] = json.loads(value)
        except ValueError:
            kwargs[key] = value
    recipe: dict[str, Any] = {"model": model, "steps": [{"quantize": step}], "model_args": kwargs}
    if args.input_shape:
        recipe["input_shape"] = args.input_shape
    if args.arch:
        recipe["arch"] = args.arch
    res = run(
        recipe,
        manager=get_manager(),
        output=args.output,
        verify=not args.no_verify,
        force=args.force,
        log=_log,
    )
    print(f"report: {res.output / 'report.md'}")
    print(f"model:  {res.artifact.path}")
    return 0


@hookimpl
def damo_cli(subparsers: argparse._SubParsersAction) -> None:
    from damo_plugins.cli import add_model_args

    p = subparsers.add_parser("quantize", help="INT8 post-training quantization through an adapter")
    add_model_args(p)
    p.add_argument("--adapter", default="nncf", help="nncf | inc | onnxruntime (default nncf)")
    p.add_argument(
        "--target", choices=("openvino", "onnx"), help="output format (default: per adapter)"
    )
    p.add_argument(
        "--calib",
        required=True,
        metavar="SRC",
        help="calibration data: an image folder, a .npy/.npz file, or generated[:N] (smoke runs)",
    )
    p.add_argument(
        "--subset", type=int, default=300, metavar="N", help="calibration samples to use"
    )
    p.add_argument(
        "--mode", choices=("int8", "weights"), default="int8", help="weights: weight-only (NNCF)"
    )
    p.add_argument(
        "--max-drop",
        type=float,
        help="accuracy control: largest allowed drop (needs --val); absolute mAP@[.5:.95] "
        "with labelled --val, else agreement with FP32",
    )
    p.add_argument(
        "--val",
        metavar="SRC",
        help="validation data: a labelled COCO folder (DIR/val/ + DIR/val.json) or COCO .json "
        "-> mAP; or images/.npy/.npz/generated (as --calib) -> agreement with FP32",
    )
    p.add_argument(
        "--no-keep-head", action="store_true", help="quantize the detector decode too (not advised)"
    )
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--no-verify", action="store_true", help="skip the INT8-vs-FP32 check")
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    p.set_defaults(func=cmd_quantize)
