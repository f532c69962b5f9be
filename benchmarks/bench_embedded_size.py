"""OpenVINO f32 vs NNCF INT8 latency of DAMO-YOLO-T at several widths and input sizes.

    python benchmarks/bench_embedded_size.py 0.25@256,0.25@320,0.375@320,0.5@256,0.5@320 [ROUNDS]

Why: the embedded demo model must be large enough that compute, not per-inference overhead,
dominates batch-1 latency on a 2-core CPU, or INT8 cannot be faster than FP32. Weights are
untrained (latency does not depend on them). Each candidate is fused (``reparam``), exported,
converted to OpenVINO IR and quantized by NNCF through the ``quantize`` pass (decode kept in
float, as the demo deploys it); all IRs are then timed in the same interleaved rounds
(batch 1, OpenVINO's default CPU threads, latency hint). Printed per candidate: median ms with
the lowest and highest per-round median, and the per-round f32/INT8 ratio (median, range).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from damo_plugins.core.artifact import build_model
from damo_plugins.core.manager import get_manager
from damo_plugins.lib.timing import interleaved_timing
from damo_plugins.optimize import measure


def main(argv: list[str]) -> None:
    mgr = get_manager()
    cands = [(float(w), int(s)) for w, s in (c.split("@") for c in argv[0].split(","))]
    rounds = int(argv[1]) if len(argv) > 1 else 7
    fns, info = {}, {}
    quiet = lambda _s: None  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="bench-embedded-") as tmp:
        for w, s in cands:
            key = f"{w}@{s}"
            art = build_model(
                "damo-yolo-t",
                mgr.get_model_builder("damo-yolo-t"),
                input_shape=[1, 3, s, s],
                model_args={"num_classes": 6, "width": w},
            )
            info[key] = (art.param_count(), art.flops())
            wd = Path(tmp) / key
            fused = measure.apply(mgr, "reparam", {}, art, wd / "rep", quiet).artifact
            ov = measure.to_runtime(fused, "openvino", mgr, wd, quiet)
            q_cfg = {
                "adapter": "nncf",
                "target": "openvino",
                "calibration": {"synthetic": 32},
                "subset_size": 32,
            }
            q = measure.apply(mgr, "quantize", q_cfg, ov, wd / "q", quiet).artifact
            feed = np.random.default_rng(0).uniform(0, 255, (1, 3, s, s)).astype(np.float32)
            fns[f"{key} f32"] = measure.runner(ov, "openvino", "f32", "CPU", mgr, feed)
            fns[f"{key} int8"] = measure.runner(q, "openvino", "f32", "CPU", mgr, feed)
            print(key, *info[key], flush=True)
        t = interleaved_timing(fns, rounds, slot_seconds=0.5, warmup=3, slot_warmup=2)
    for key, (params, flops) in info.items():
        f, i = t.per_round(f"{key} f32"), t.per_round(f"{key} int8")
        ratios = sorted(a / b for a, b in zip(f, i))
        print(
            f"{key}: params {params / 1e6:.2f}M GFLOPs {flops / 1e9:.3f} "
            f"f32 {t.median(f'{key} f32'):.2f} ms [{min(f):.2f}-{max(f):.2f}] "
            f"int8 {t.median(f'{key} int8'):.2f} ms [{min(i):.2f}-{max(i):.2f}] "
            f"speedup median {statistics.median(ratios):.2f} range {ratios[0]:.2f}-{ratios[-1]:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
