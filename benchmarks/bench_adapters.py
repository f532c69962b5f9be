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

Run: ``python benchmarks/bench_adapters.py [--model damo-yolo-s] [--size 640] [--rounds 5]``
Writes ``docs/benchmarks/adapters.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cpuinfo_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return next(
        (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )


def _has_bf16() -> bool:
    flags = _cpuinfo_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _cpu_flags() -> str:
    flags = _cpuinfo_flags()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return ", ".join(f for f in wanted if f in flags) or "none of AVX2/AVX-512/VNNI/BF16/AMX"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="damo-yolo-s")
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--calib", type=int, default=16, help="generated calibration images")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=4, help="latency runs per variant per round")
    ap.add_argument("--tput-seconds", type=float, default=3.0)
    ap.add_argument("--skip", default="", help="comma-separated paths to skip (inc, nncf, ort)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "adapters.md"))
    args = ap.parse_args()

    import onnxruntime
    import openvino

    from damo_plugins.core.artifact import load_model, onnx_artifact
    from damo_plugins.core.manager import get_manager
    from damo_plugins.core.passes import PassContext
    from damo_plugins.data.calibration import generated_images
    from damo_plugins.lib.fidelity import compare_int8, runner
    from damo_plugins.lib.onnx_export import export_onnx

    mgr = get_manager()
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
        rep = mgr.get_pass("reparam")()
        art = rep.run(art, PassContext(manager=mgr, workdir=Path("."), log=lambda *_: None))
        fused = "fused with the `reparam` pass"
    else:
        fused = "not fused (no reparam pass installed)"
    log(f"built {name} {shape} ({fused}) in {time.perf_counter() - t0:.1f}s")
    calib = generated_images(args.calib, input_shape=shape, seed=0)
    held = list(generated_images(4, input_shape=shape, seed=1234))

    ov_ad, ort_ad = mgr.get_adapter("openvino"), mgr.get_adapter("onnxruntime")
    fp32_onnx = onnx_artifact(export_onnx(art))
    fp32_ov = ov_ad.convert(fp32_onnx)
    variants: dict[str, tuple[str, Any]] = {
        "OpenVINO FP32": ("openvino", fp32_ov),
        "ONNX Runtime FP32": ("onnxruntime", fp32_onnx),
    }
    if _has_bf16():
        # What OpenVINO runs an FP32 model as by default on a bf16-capable CPU.
        variants["OpenVINO FP32 model, bf16 inference"] = ("openvino-bf16", fp32_ov)
    qtime: dict[str, float] = {}

    def timed(label: str, fn: Any) -> Any:
        log(f"quantizing: {label} ...")
        t = time.perf_counter()
        out = fn()
        qtime[label] = time.perf_counter() - t
        log(f"  done in {qtime[label]:.0f}s")
        return out

    if "nncf" not in skip:
        q = timed(
            "NNCF -> OpenVINO INT8",
            lambda: mgr.get_adapter("nncf").quantize(
                fp32_ov, calib, target="openvino", subset_size=args.calib
            ),
        )
        variants["NNCF -> OpenVINO INT8"] = ("openvino", q)
    if "inc" not in skip:
        try:
            q = timed(
                "INC -> OpenVINO INT8",
                lambda: mgr.get_adapter("inc").quantize(
                    art, calib, target="openvino", subset_size=args.calib
                ),
            )
            variants["INC -> OpenVINO INT8"] = ("openvino", q)
        except Exception as exc:  # reported in the table, the other paths still run
            log(f"  INC failed: {exc}")
            qtime["INC -> OpenVINO INT8"] = float("nan")
    if "ort" not in skip:
        q = timed(
            "ONNX Runtime QDQ INT8",
            lambda: ort_ad.quantize(fp32_onnx, calib, subset_size=args.calib),
        )
        variants["ONNX Runtime QDQ INT8"] = ("onnxruntime", q)
        variants["OpenVINO running ORT's QDQ"] = ("openvino", ov_ad.convert(q))

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

    # Interleaved latency and throughput.
    threads = os.cpu_count() or 2
    lat: dict[str, list[float]] = {k: [] for k in variants}
    first: dict[str, float] = {}
    tput: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for label, (adapter, v) in variants.items():
            ad = ort_ad if adapter == "onnxruntime" else ov_ad
            prec = "bf16" if adapter == "openvino-bf16" else "f32"
            s = ad.benchmark(
                v,
                "CPU",
                hint="latency",
                iterations=args.iters,
                warmup=1,
                threads=threads,
                precision=prec,
            )
            lat[label].append(s["median_ms"])
            first.setdefault(label, s["first_inference_ms"])
        for label, (adapter, v) in variants.items():
            ad = ort_ad if adapter == "onnxruntime" else ov_ad
            prec = "bf16" if adapter == "openvino-bf16" else "f32"
            s = ad.benchmark(
                v, "CPU", hint="throughput", seconds=args.tput_seconds, warmup=1, precision=prec
            )
            tput[label].append(s["fps"])
        log(
            f"round {r + 1}/{args.rounds}: "
            + ", ".join(f"{k} {lat[k][-1]:.0f}ms" for k in variants)
        )

    base_lat = statistics.median(lat["OpenVINO FP32"])
    base_fps = statistics.median(tput["OpenVINO FP32"])
    lines = [
        "## Adapters: FP32 vs INT8 per quantization path",
        "",
        f"Model: `{name}` at {shape[2]}x{shape[3]}, batch 1, {fused}; random weights. {model_note}".rstrip(),
        f"Machine: {platform.processor() or platform.machine()}, {threads} cores, "
        f"CPU flags: {_cpu_flags()} "
        f"(shared with other jobs while measuring: absolute numbers are noisy, ratios measured "
        f"side by side in the same rounds are the figures to quote). OpenVINO {openvino.__version__}, "
        f"ONNX Runtime {onnxruntime.__version__}.",
        f"Calibration: {args.calib} generated images; decode kept in FP32 (default). "
        "OpenVINO runs float ops at f32 (`INFERENCE_PRECISION_HINT=f32`, the adapter's default) "
        "except in the bf16 row, which is what OpenVINO picks by itself on a bf16-capable CPU. "
        f"Latency: median over {args.rounds} interleaved rounds of {args.iters} sequential runs "
        f"(LATENCY hint); throughput: THROUGHPUT hint / parallel requests, {args.tput_seconds:.0f} s per round.",
        "",
        "| variant | latency median ms | vs OV FP32 | first inference ms | throughput FPS | vs OV FP32 "
        "| cosine min vs PyTorch | top-det. agreement | quantize s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label in variants:
        ml, mf = statistics.median(lat[label]), statistics.median(tput[label])
        ag = agreement[label]
        det = ag.get("top_detection_agreement")
        qt = qtime.get(label.replace("OpenVINO running ORT's QDQ", "ONNX Runtime QDQ INT8"))
        lines.append(
            f"| {label} | {ml:.1f} | {base_lat / ml:.2f}x | {first[label]:.0f} | {mf:.2f} | {mf / base_fps:.2f}x "
            f"| {ag['cosine_min']:.4f} | {'-' if det is None else f'{det:.2f}'} "
            f"| {'-' if qt is None else f'{qt:.0f}'} |"
        )
    best = max(
        (k for k in variants if "INT8" in k or "QDQ" in k),
        key=lambda k: base_lat / statistics.median(lat[k]),
        default=None,
    )
    lines += [
        "",
        f"Fastest INT8 path (latency): **{best}**." if best else "",
        "",
        f"Command: `python benchmarks/bench_adapters.py --model {args.model} --size {args.size} "
        f"--rounds {args.rounds}`",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n", encoding="utf-8")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
