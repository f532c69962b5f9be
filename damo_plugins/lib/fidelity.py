"""INT8 fidelity: does a quantized model compute what its FP32 original does?

Cosine similarity of every output on held-out inputs and, for detectors, agreement of the top
detections (:func:`top_detection_agreement`). :func:`fidelity` folds them into one number in
[0, 1], the default accuracy-control metric when no labels are given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from damo_plugins.core.verify import compare_outputs
from damo_plugins.lib.boxes import box_iou

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from damo_plugins.core.artifact import ModelArtifact
    from damo_plugins.core.manager import PluginManager


def detector_outputs(
    outputs: Sequence[np.ndarray], names: Sequence[str] = ()
) -> tuple[int, int] | None:
    """Indices of (scores ``[N, A, C]``, boxes ``[N, A, 4]``) if the outputs look like a detector."""
    import numpy as np

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
    import numpy as np

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
            if same.any() and float(box_iou(rb[a][None], cb[c_anchor[same]]).max()) >= iou:
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
    import numpy as np

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
    import numpy as np

    if artifact.format == "onnx":
        from damo_plugins.core.onnx_utils import ort_session

        sess = ort_session(artifact.model)
        names = [i.name for i in sess.get_inputs()]
        return lambda feeds: list(sess.run(None, dict(zip(names, feeds))))
    if artifact.format == "openvino":
        from damo_plugins.core.manager import get_manager

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
    import numpy as np

    if isinstance(item, np.ndarray):
        return [item]
    return [np.asarray(x) for x in item]


#: ONNX ops that carry INT8 arithmetic or its quantize/dequantize boundary
ONNX_QUANTIZED = frozenset(
    {
        "QuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "ConvInteger",
        "MatMulInteger",
        "DynamicQuantizeLinear",
    }
)
#: ops quantization is about (what a quantizer could make INT8)
ONNX_QUANTIZABLE = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "MatMul",
        "Gemm",
        "QLinearConv",
        "ConvInteger",
        "QLinearMatMul",
        "MatMulInteger",
    }
)
OV_QUANTIZABLE = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "MatMul")


def quantized_ops(artifact: ModelArtifact) -> dict[str, int]:
    """How much of a model is really quantized: counted in its graph, whatever a backend said.

    ``quantized_ops``: quantize operations (ONNX ``QuantizeLinear``/``QLinear*``/``*Integer``;
    OpenVINO ``FakeQuantize`` plus 8/4-bit weight constants of weight-only compression);
    ``quantizable_ops``: convolutions and matrix products. Accuracy control can revert every
    quantizer and hand back an FP32 graph; this count is what stops such a model from being
    called INT8.
    """
    if artifact.format == "onnx":
        ops = [n.op_type for n in artifact.model.graph.node]
        return {
            "quantized_ops": sum(op in ONNX_QUANTIZED for op in ops),
            "quantizable_ops": sum(op in ONNX_QUANTIZABLE for op in ops),
        }
    if artifact.format == "openvino":
        from damo_plugins.lib.openvino_graph import count_types

        model = artifact.model
        low_bit = sum(
            1
            for op in model.get_ordered_ops()
            if op.get_type_name() == "Constant"
            and op.get_output_element_type(0).get_type_name() in ("i8", "u8", "i4", "u4", "nf4")
        )
        return {
            "quantized_ops": count_types(model, "FakeQuantize") + low_bit,
            "quantizable_ops": count_types(model, *OV_QUANTIZABLE),
        }
    return {"quantized_ops": 0, "quantizable_ops": 0}
