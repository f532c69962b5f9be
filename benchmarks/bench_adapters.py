"""FP32 vs INT8 per quantization path on DAMO-YOLO (fused), CPU.

Paths: NNCF -> OpenVINO, INC (PT2E) -> OpenVINO, ONNX Runtime QDQ (uint8 activations),
OpenVINO running ONNX Runtime's QDQ model; baselines OpenVINO FP32 and ONNX Runtime FP32.
Each INT8 model keeps the detector decode in floating point (the adapters' default).

Measured interleaved: every round runs every variant (latency: sequential requests after
warm-up; throughput: the THROUGHPUT hint / parallel requests for a few seconds), and we report
medians over rounds and ratios against OpenVINO FP32. Output agreement of each INT8 model
with the PyTorch FP32 model is measured on held-out generated images (cosine similarity and
top-detection agreement). Weights are random (no trained checkpoint here), so agreement
numbers say "computes the same thing", not mAP.

Every model is made by the project's passes through the step runner (``reparam``, ``export``,
``convert``, ``quantize``: each verified as a recipe step would be).

Run: ``python benchmarks/bench_adapters.py [--model damo-yolo-s] [--size 640] [--rounds 5]``
Writes ``docs/benchmarks/adapters.md`` (``--doc`` elsewhere).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    DOCS,
    apply_pass,
    command,
    interleave,
    log,
    machine,
    machine_line,
    md_table,
    quiet,
    round_ratio,
    verdict,
    write_section,
)

from damo_plugins.core.errors import DamoError

BASE = "OpenVINO FP32"


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="damo-yolo-s")
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--calib", type=int, default=16, help="generated calibration images")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=4, help="latency runs per variant per round")
    ap.add_argument("--tput-seconds", type=float, default=3.0)
    ap.add_argument("--skip", default="", help="comma-separated paths to skip (inc, nncf, ort)")
    ap.add_argument("--work", default="runs/bench_adapters", help="scratch folder for the passes")
    ap.add_argument("--doc", "--out", dest="doc", default=str(DOCS / "adapters.md"))
    args = ap.parse_args(argv)

    from damo_plugins.core.artifact import load_model
    from damo_plugins.core.manager import get_manager
    from damo_plugins.data.calibration import generated_images
    from damo_plugins.lib.fidelity import compare_int8, runner

    mgr = get_manager()
    work = Path(args.work)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    shape = [1, 3, args.size, args.size]
    model_note = ""
    name = args.model
    if name not in mgr.names("model"):
        model_note = f"`{name}` is not registered here; measured `tiny-cnn` instead."
        name = "tiny-cnn"
        shape = [1, 3, 64, 64]
    t0 = time.perf_counter()
    art = load_model(name, manager=mgr, input_shape=shape)
    if "reparam" in mgr.names("pass"):
        art = apply_pass(mgr, "reparam", {}, art, work, log=quiet).raise_if_failed().artifact
        fused = "fused with the `reparam` pass"
    else:
        fused = "not fused (no reparam pass installed)"
    log(f"built {name} {shape} ({fused}) in {time.perf_counter() - t0:.1f}s")
    held = list(generated_images(4, input_shape=shape, seed=1234))
    info = machine()

    ov_ad, ort_ad = mgr.get_adapter("openvino"), mgr.get_adapter("onnxruntime")
    fp32_onnx = apply_pass(mgr, "export", {}, art, work, log=quiet).raise_if_failed().artifact
    fp32_ov = apply_pass(mgr, "convert", {}, fp32_onnx, work, log=quiet).raise_if_failed().artifact
    variants: dict[str, tuple[str, Any]] = {
        BASE: ("openvino", fp32_ov),
        "ONNX Runtime FP32": ("onnxruntime", fp32_onnx),
    }
    if info["bf16"]:
        # What OpenVINO runs an FP32 model as by default on a bf16-capable CPU.
        variants["OpenVINO FP32 model, bf16 inference"] = ("openvino-bf16", fp32_ov)
    qtime: dict[str, float] = {}
    checks: dict[str, str] = {}

    def quantize(label: str, adapter: str, src: Any) -> Any:
        """The ``quantize`` pass (decode kept in FP), timed without its verification."""
        log(f"quantizing: {label} ...")
        config = {"adapter": adapter, "calibration": {"generated": args.calib}}
        res = apply_pass(mgr, "quantize", {**config, "subset_size": args.calib}, src, work)
        qtime[label], checks[label] = res.seconds, verdict(res)
        log(f"  done in {res.seconds:.0f}s; INT8 check {checks[label]}")
        return res.artifact

    if "nncf" not in skip:
        variants["NNCF -> OpenVINO INT8"] = (
            "openvino",
            quantize("NNCF -> OpenVINO INT8", "nncf", fp32_ov),
        )
    if "inc" not in skip:
        try:
            q = quantize("INC -> OpenVINO INT8", "inc", art)
            variants["INC -> OpenVINO INT8"] = ("openvino", q)
        except DamoError as exc:  # reported in the table, the other paths still run
            log(f"  INC failed: {exc}")
            qtime["INC -> OpenVINO INT8"] = float("nan")
    if "ort" not in skip:
        q = quantize("ONNX Runtime QDQ INT8", "onnxruntime", fp32_onnx)
        variants["ONNX Runtime QDQ INT8"] = ("onnxruntime", q)
        # not verified against ONNX Runtime: two runtimes' INT8 kernels round differently;
        # its agreement with PyTorch is measured below like every other variant's
        in_ov = apply_pass(mgr, "convert", {}, q, work, log=quiet, verify=False).artifact
        variants["OpenVINO running ORT's QDQ"] = ("openvino", in_ov)

    # Agreement with PyTorch FP32 on held-out inputs.
    ref_run = runner(art, mgr)
    refs = [ref_run([x]) for x in held]
    agreement = {}
    for label, (adapter, v) in variants.items():
        if adapter == "openvino-bf16":
            compiled = ov_ad.compile(v, "CPU", precision="bf16")

            def run(feeds: Any, compiled: Any = compiled) -> list[np.ndarray]:
                res = compiled(list(feeds))
                return [np.asarray(res[o]) for o in compiled.outputs]
        else:
            run = runner(v, mgr)
        agreement[label] = compare_int8(
            refs, [run([x]) for x in held], [t.name for t in art.outputs]
        )

    # Interleaved latency and throughput: every (variant, measure) once per round.
    threads = os.cpu_count() or 2

    def bench(label: str, hint: str) -> Any:
        adapter, v = variants[label]
        ad = ort_ad if adapter == "onnxruntime" else ov_ad
        if hint == "latency":
            opts = {"iterations": args.iters, "threads": threads}
        else:
            opts = {"seconds": args.tput_seconds}
        if ad is ov_ad:  # an OpenVINO option: ONNX Runtime rejects it
            opts["precision"] = "bf16" if adapter == "openvino-bf16" else "f32"
        return lambda: ad.benchmark(v, "CPU", hint=hint, warmup=1, **opts)

    measures = {(k, h): bench(k, h) for h in ("latency", "throughput") for k in variants}
    stats = interleave(measures, args.rounds)
    lat = {k: [s["median_ms"] for s in stats[(k, "latency")]] for k in variants}
    tput = {k: [s["fps"] for s in stats[(k, "throughput")]] for k in variants}
    first = {k: stats[(k, "latency")][0]["first_inference_ms"] for k in variants}

    rows = []
    for label in variants:
        ag = agreement[label]
        det = ag.get("top_detection_agreement")
        qt = qtime.get(label.replace("OpenVINO running ORT's QDQ", "ONNX Runtime QDQ INT8"))
        rows.append(
            [
                label,
                f"{statistics.median(lat[label]):.1f}",
                f"{round_ratio(lat[BASE], lat[label]):.2f}x",
                f"{first[label]:.0f}",
                f"{statistics.median(tput[label]):.2f}",
                f"{round_ratio(tput[label], tput[BASE]):.2f}x",
                f"{ag['cosine_min']:.4f}",
                "-" if det is None else f"{det:.2f}",
                "-" if qt is None else f"{qt:.0f}",
            ]
        )
    best = max(
        (k for k in variants if "INT8" in k or "QDQ" in k),
        key=lambda k: round_ratio(lat[BASE], lat[k]),
        default=None,
    )
    head = ["variant", "latency median ms", "vs OV FP32", "first inference ms"]
    head += ["throughput FPS", "vs OV FP32", "cosine min vs PyTorch", "top-det. agreement"]
    lines = [
        "## Adapters: FP32 vs INT8 per quantization path",
        "",
        f"Command: `{command(__file__, argv)}`",
        "",
        machine_line(info),
        "",
        f"Model: `{name}` at {shape[2]}x{shape[3]}, batch 1, {fused}; random weights. {model_note}".rstrip(),
        f"Calibration: {args.calib} generated images; decode kept in FP32 (default). "
        "OpenVINO runs float ops at f32 (`INFERENCE_PRECISION_HINT=f32`, the adapter's default) "
        "except in the bf16 row, which is what OpenVINO picks by itself on a bf16-capable CPU. "
        f"Latency: median over {args.rounds} interleaved rounds of {args.iters} sequential runs "
        f"(LATENCY hint, {threads} threads); throughput: THROUGHPUT hint / parallel requests, "
        f"{args.tput_seconds:g} s per round. Ratios against OpenVINO FP32 are medians of the "
        "per-round ratios.",
        "",
        *md_table([*head, "quantize s"], rows),
        "",
        f"Fastest INT8 path (latency): **{best}**." if best else "",
        "",
        "INT8 checks (the `quantize` pass's verification): "
        + "; ".join(f"{k}: {v}" for k, v in checks.items())
        if checks
        else "",
    ]
    text = "\n".join(lines).rstrip("\n") + "\n"
    print(text)
    log(f"wrote {write_section(args.doc, text)}")


if __name__ == "__main__":
    main()
