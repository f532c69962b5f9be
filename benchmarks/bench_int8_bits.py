"""INT8 accuracy with 8-bit vs 7-bit weights, on the demo model, per quantizing adapter.

    python benchmarks/bench_int8_bits.py [--images 200] [--calib 64] [--doc docs/benchmarks/adapters.md]

Why: an INT8 convolution on a CPU without VNNI (AVX2 only) multiplies u8 activations by s8
weights with ``vpmaddubsw``, which adds pairs of products in 16 bits and saturates when the
weights use the full 8-bit range. Quantizers offer 7-bit weights for such CPUs (NNCF
``overflow_fix``, ONNX Runtime ``reduce_range``); the adapters turn them on by default exactly
when the CPU has no VNNI. This measures what that choice is worth: the shipped demo model
(fused), quantized both ways by NNCF (deployed in OpenVINO) and by ONNX Runtime (QDQ, run in
ONNX Runtime), COCO mAP on generated val images no calibration image is among (calibration
uses the train split).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from common import command, machine, machine_line, md_table, write_section

from damo_plugins import api
from damo_plugins.demo import embedded_checkpoint

#: (label, adapter, target, option, value) — each adapter's own name for the weight width
VARIANTS = (
    ("NNCF, 8-bit weights (overflow_fix first_layer_only, NNCF's default)", "nncf", "openvino",
     "overflow_fix", "first_layer_only"),
    ("NNCF, 7-bit weights (overflow_fix enable)", "nncf", "openvino", "overflow_fix", "enable"),
    ("ONNX Runtime, 8-bit weights (reduce_range false)", "onnxruntime", "onnx",
     "reduce_range", False),
    ("ONNX Runtime, 7-bit weights (reduce_range true)", "onnxruntime", "onnx",
     "reduce_range", True),
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200, help="generated val images for mAP")
    ap.add_argument("--calib", type=int, default=64, help="calibration images (train split)")
    ap.add_argument("--doc", help="Markdown file to write the section into (else print only)")
    args = ap.parse_args(argv)
    info = machine()
    ckpt = embedded_checkpoint()
    fused = api.run_pass("reparam", api.load(ckpt)).artifact
    onnx = api.run_pass("export", fused, opset=17).artifact
    ir = api.run_pass("convert", onnx, to="openvino").artifact
    fp32 = {
        "openvino": api.evaluate(ir, data="generated", images=args.images)["mAP"],
        "onnx": api.evaluate(onnx, data="generated", images=args.images)["mAP"],
    }
    rows, results = [], []
    for label, adapter, target, option, value in VARIANTS:
        q = api.quantize(
            ir if target == "openvino" else onnx,
            adapter=adapter,
            target=target,
            calibration={"synthetic": args.calib},
            subset_size=args.calib,
            **{option: value},
        )
        m = api.evaluate(q, data="generated", images=args.images)["mAP"]
        base = fp32[target]
        runtime = "OpenVINO f32 hint" if target == "openvino" else "ONNX Runtime"
        results.append({"variant": label, "mAP": m, "fp32_mAP": base})
        rows.append(
            [label, runtime, f"{100 * base:.2f}", f"{100 * m:.2f}", f"{100 * (m - base):+.2f}"]
        )
        print(rows[-1], flush=True)
    text = "\n".join(
        [
            "### INT8 with 8-bit vs 7-bit weights on this CPU",
            "",
            f"Command: `{command(__file__, list(argv or sys.argv[1:]))}`",
            "",
            machine_line(info),
            f"This CPU has VNNI: **{'yes' if info['vnni'] else 'no'}**.",
            "",
            f"Model: the demo's `{ckpt.name}` (fused), 256 px; {args.calib} calibration images "
            f"(generated train split), mAP@[.5:.95] on {args.images} generated val images.",
            "",
            *md_table(["INT8 variant", "runtime", "FP32 mAP", "INT8 mAP", "ΔmAP (points)"], rows),
            "",
        ]
    )
    print(text)
    if args.doc:
        write_section(args.doc, text, key="int8-weight-bits")
    return {"rows": results, "vnni": info["vnni"]}


if __name__ == "__main__":
    main()
