"""Keypoint post-processing: exported graphs (ONNX Runtime, OpenVINO) vs the eager per-ROI loop.

Run: ``python benchmarks/bench_keypoints.py [--rounds 5] [--threads 2]``; prints Markdown and
writes it as the ``measured`` section of ``docs/benchmarks/keypoints.md`` (``--doc``; the
hand-written text around it is kept). Variants are interleaved round by round; medians and
ratios to the eager loop (medians of per-round ratios) are reported.
Heatmaps: "peaked" (a Gaussian blob plus noise per keypoint, what a trained head produces)
and "noise" (i.i.d. normal logits: the worst case of the pruned and vectorized forms, whose
certificate then fails and every ROI takes the exact per-ROI fallback). Peak memory is the growth
of the process's max RSS while running, measured in a fresh subprocess per variant.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from common import DOCS, command, interleaved_timing, log, machine_line, md_table, write_section

K = 17


def eager_loop(maps: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
    """Detectron2's algorithm as written: one bicubic resize per ROI."""
    out = maps.new_zeros(maps.shape[0], K, 4)
    w = (rois[:, 2] - rois[:, 0]).clamp(min=1)
    h = (rois[:, 3] - rois[:, 1]).clamp(min=1)
    wc, hc = w.ceil(), h.ceil()
    for i in range(maps.shape[0]):
        big = F.interpolate(maps[[i]], size=(int(hc[i]), int(wc[i])), mode="bicubic")[0]
        logit, pos = big.reshape(K, -1).max(1)
        xi, yi = pos % big.shape[2], pos // big.shape[2]
        out[i, :, 0] = (xi + 0.5) * (w[i] / wc[i]) + rois[i, 0]
        out[i, :, 1] = (yi + 0.5) * (h[i] / hc[i]) + rois[i, 1]
        out[i, :, 2] = logit
        out[i, :, 3] = 1 / (maps[i] - logit[:, None, None]).exp().sum((1, 2))
    return out


def inputs(kind: str, r: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Person boxes in a 1333 x 800 image: height 100–500 px, aspect 0.3–0.6."""
    g = torch.Generator().manual_seed(seed)
    hgt = torch.rand(r, generator=g) * 400 + 100
    wid = hgt * (torch.rand(r, generator=g) * 0.3 + 0.3)
    x0, y0 = torch.rand(r, generator=g) * 1000, torch.rand(r, generator=g) * 300
    rois = torch.stack([x0, y0, x0 + wid, y0 + hgt], 1)
    if kind == "noise":
        return torch.randn(r, K, 56, 56, generator=g), rois
    yy, xx = torch.meshgrid(torch.arange(56.0), torch.arange(56.0), indexing="ij")
    c = torch.rand(r, K, 2, generator=g) * 44 + 6
    d2 = (yy - c[..., 0, None, None]) ** 2 + (xx - c[..., 1, None, None]) ** 2
    return 8 * torch.exp(-d2 / 8) + 0.5 * torch.randn(r, K, 56, 56, generator=g), rois


def make(variant: str, threads: int):
    """A callable(maps, rois) for a variant: eager, or '<method>-<ort|ov>'."""
    torch.set_num_threads(threads)
    if variant == "eager":
        return lambda m, r: eager_loop(m, r)
    from damo_plugins.keypoints.export import export_postprocess, openvino_runner, ort_runner

    method, backend = variant.split("-")
    proto = export_postprocess(17, method, K)
    run = (ort_runner if backend == "ort" else openvino_runner)(proto, threads=threads)
    return lambda m, r: run([m.numpy(), r.numpy()])


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_peak(fn, m: torch.Tensor, r: torch.Tensor) -> float:
    """Highest RSS above the starting RSS while ``fn`` runs twice (sampled every 1 ms).

    ru_maxrss cannot be used: exporting the graph already peaks higher than inference.
    """
    fn(m[:1], r[:1])
    base, peak, stop = _rss_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb() - base)
            time.sleep(0.001)

    t = threading.Thread(target=sample)
    t.start()
    fn(m, r)
    fn(m, r)
    stop.set()
    t.join()
    return peak[0]


def peak_memory(variant: str, kind: str, r: int, threads: int) -> float:
    """MB of RSS growth while running ``variant`` twice, in a fresh process."""
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
        "import bench_keypoints as b;"
        f"f = b.make({variant!r}, {threads}); m, r = b.inputs({kind!r}, {r});"
        "print(b.measure_peak(f, m, r))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _fidelity_text(fid: dict[str, float], features: dict[str, float]) -> str:
    """One line: FPN maps per level, then the detection match."""
    levels = sorted({k.split("_")[0] for k in features if k[0] == "p"}, key=lambda k: int(k[1:]))
    maps = ", ".join(
        f"{k} cos {features[k + '_cos']:.4f} / SNR {features[k + '_snr_db']:.1f} dB" for k in levels
    )
    det = ", ".join(
        f"{k} {fid[k]:.3g}"
        for k in (
            "fp32_detections",
            "int8_detections",
            "matched",
            "mean_iou",
            "max_dscore",
            "unmatched_max_score",
            "kp_p95_px",
        )
    )
    return f"FPN maps: {maps}; detections: {det}"


def _int8_variants(
    proto, variants: list[str], size: tuple[int, int], args, sess, notes: list[str]
) -> dict:
    """Quantize for ``ov-int8`` / ``ort-int8`` on the same random images; ``{variant: run}``.

    Appends to ``notes`` what is INT8 (counted in the graph each runtime executes) and the
    fidelity to the FP32 model in the same runtime on two held-out random images.
    """
    from damo_plugins.core.onnx_utils import ort_session
    from damo_plugins.keypoints import int8

    wanted = [v for v in variants if v.endswith("-int8")]
    if not wanted:
        return {}
    g = torch.Generator().manual_seed(1)
    h0, w0 = size
    calib = [(torch.rand(1, 3, h0, w0, generator=g) * 255).numpy() for _ in range(args.calib)]
    held = [(torch.rand(1, 3, h0, w0, generator=g) * 255).numpy() for _ in range(2)]
    where = f"calibrated on {args.calib} random {h0}x{w0} images; fidelity on 2 other ones"
    fns = {}
    if "ov-int8" in wanted:
        log(f"ov-int8: quantizing on {args.calib} random {h0}x{w0} images ...")
        t0 = time.perf_counter()
        q_model, info = int8.quantize_keypoint_rcnn(proto, calib)
        log(f"quantized in {time.perf_counter() - t0:.0f} s: {info}")
        # static: OpenVINO 2026.4 miscomputes these INT8 convolutions with dynamic shapes
        fid = int8.compare_int8_model(proto, q_model, held, threads=args.threads, static=True)
        feats = int8.feature_fidelity(
            int8.openvino_features(proto, args.threads, static=True),
            int8.openvino_features(q_model, args.threads, static=True),
            held,
        )
        dynamic = int8.feature_fidelity(
            int8.openvino_features(proto, args.threads),
            int8.openvino_features(q_model, args.threads),
            held,
        )
        notes.append(
            f"- ov-int8 (NNCF, OpenVINO backend; compiled per input size with the shape fixed): "
            f"{info['quantized_layers']} of {info['backbone_layers']} backbone/FPN convolutions "
            f"INT8 ({info['fake_quantize']} FakeQuantize, 7-bit weights: overflow fix "
            f"{info['overflow_fix']}), everything else float; {where}, vs ov: "
            + _fidelity_text(fid, feats)
            + ". The same IR compiled with its dynamic shape (as a plain `compile_model`): FPN "
            + ", ".join(
                f"{k.split('_')[0]} SNR {v:.1f} dB"
                for k, v in dynamic.items()
                if k[0] == "p" and k.endswith("_snr_db")
            )
        )
        fns["ov-int8"] = int8.openvino_f32(q_model, args.threads, static=True)
    if "ort-int8" in wanted:
        log(f"ort-int8: quantizing the ONNX graph on {args.calib} random {h0}x{w0} images ...")
        t0 = time.perf_counter()
        q_proto, info = int8.quantize_onnx_keypoint_rcnn(proto, calib)
        log(f"quantized in {time.perf_counter() - t0:.0f} s: {info}")
        executed = int8.ort_executed_ops(q_proto, args.threads)
        log(f"ORT executes: { {k: v for k, v in executed.items() if 'Q' in k or 'Conv' in k} }")
        q_sess = ort_session(q_proto, threads=args.threads)
        ref = [sess.run(None, {"image": x}) for x in held]
        out = [q_sess.run(None, {"image": x}) for x in held]
        feats = int8.feature_fidelity(
            int8.ort_features(proto, args.threads), int8.ort_features(q_proto, args.threads), held
        )
        fused = sum(executed.get(k, 0) for k in int8.ORT_INTEGER_OPS)
        notes.append(
            f"- ort-int8 (NNCF, ONNX backend, QDQ graph): {info['quantized_layers']} of "
            f"{info['backbone_layers']} backbone/FPN convolutions fed by QuantizeLinear/"
            f"DequantizeLinear in the file; in the graph ONNX Runtime executes, **{fused} "
            f"integer convolutions** (QLinearConv/ConvInteger), "
            f"{executed.get('DequantizeLinear', 0)} DequantizeLinear and "
            f"{executed.get('QuantizeLinear', 0)} QuantizeLinear left (the remaining "
            f"convolutions run float on dequantized inputs); {where}, vs ort: "
            + _fidelity_text(int8.int8_fidelity(ref, out), feats)
        )
        fns["ort-int8"] = lambda arr: q_sess.run(None, {"image": arr})
    return fns


def _static_fp32(proto, variants: list[str], threads: int) -> dict:
    """``ov-static``: the FP32 graph compiled per input size with the shape fixed, like
    ov-int8 (the fair base for its speed-up; ``ov`` keeps the dynamic shape)."""
    if "ov-static" not in variants:
        return {}
    from damo_plugins.keypoints.int8 import openvino_f32

    return {"ov-static": openvino_f32(proto, threads, static=True)}


def full_main(argv: Sequence[str]) -> None:
    """``--full``: the whole Keypoint R-CNN R50-FPN graph (ORT, OpenVINO f32) vs eager PyTorch.

    Random weights with trained scales (``random_detectron2_state``); ``--person-bias`` sets
    how many proposals pass the 0.05 score threshold, i.e. the detection count D, which drives
    the 512-channel keypoint head's cost. The export has dynamic H, W: one graph for all sizes.
    ``--variants`` picks from eager, ort, ov (OpenVINO f32, dynamic shape), ov-static (the
    same compiled per image size with the shape fixed), ov-int8 and ort-int8 (NNCF INT8 of
    the backbone + FPN, :mod:`damo_plugins.keypoints.int8`: NNCF's OpenVINO backend for
    ov-int8, compiled per size like ov-static because OpenVINO 2026.4 miscomputes it with a
    dynamic shape; its ONNX backend -- a QDQ ONNX graph -- for ort-int8; both calibrated on
    the same ``--calib`` random images of the first size). Their fidelity to the FP32 model
    in the same runtime is reported on two other random images: FPN maps (cosine, SNR) and
    detections. Ratios are to the first variant.
    """
    from damo_plugins.keypoints.export import OPENVINO_F32_CONFIG, export_keypoint_model
    from damo_plugins.keypoints.rcnn import KeypointRCNN, random_detectron2_state

    ap = argparse.ArgumentParser(description=full_main.__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", default="800x1333,480x640", help="HxW,...")
    ap.add_argument("--person-bias", type=float, default=1.0)
    ap.add_argument(
        "--variants", default="eager,ort,ov", help="eager,ort,ort-int8,ov,ov-static,ov-int8"
    )
    ap.add_argument("--calib", type=int, default=4, help="random calibration images (*-int8)")
    ap.add_argument("--key", default="full-model", help="section of --doc to write")
    ap.add_argument("--doc", default=str(DOCS / "keypoints.md"), help="Markdown to write into")
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    unknown = set(variants) - {"eager", "ort", "ort-int8", "ov", "ov-static", "ov-int8"}
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}")
    sizes = [tuple(int(v) for v in size.lower().split("x")) for size in args.sizes.split(",")]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = KeypointRCNN().eval()
    model.load_detectron2(random_detectron2_state(model, 0, args.person_bias))
    log("exporting the whole model ...")
    proto = export_keypoint_model(model, opset=17)
    import openvino as ov

    from damo_plugins.core.onnx_utils import ort_session

    sess = ort_session(proto, threads=args.threads)
    core = ov.Core()
    config = {**OPENVINO_F32_CONFIG, "INFERENCE_NUM_THREADS": args.threads}
    compiled = core.compile_model(core.read_model(proto.SerializeToString(), b""), "CPU", config)
    notes: list[str] = []
    int8_fns = _int8_variants(proto, variants, sizes[0], args, sess, notes)
    int8_fns.update(_static_fp32(proto, variants, args.threads))
    rows = []
    speedups: list[str] = []  # INT8 vs its FP32 base, medians of per-round ratios
    for h, w in sizes:
        image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h)) * 255
        arr = image.numpy()
        detections = len(compiled({0: arr})[compiled.output(0)])  # = eager's (tested)
        log(f"{h}x{w}: {detections} detections ...")

        def eager(image: torch.Tensor = image) -> None:
            with torch.no_grad():
                model(image)

        fns = {
            "eager": eager,
            "ort": lambda arr=arr: sess.run(None, {"image": arr}),
            "ov": lambda arr=arr: compiled({0: arr}),
        }
        for name, run in int8_fns.items():
            fns[name] = lambda arr=arr, run=run: run(arr)
        times = interleaved_timing({v: fns[v] for v in variants}, args.rounds, warmup=1)
        pairs = [
            (a, b)
            for a, b in (
                ("ort", "ort-int8"),
                ("ov-static", "ov-int8"),
                ("ov", "ov-int8"),
                ("ov", "ov-static"),
            )
            if a in variants and b in variants
        ]
        if pairs:
            speedups.append(
                f"- {h}x{w}: " + ", ".join(f"{a} / {b} {times.ratio(a, b):.2f}x" for a, b in pairs)
            )
        rows.append(
            [f"{h}x{w}", detections]
            + [f"{times.median(v):.0f} ({times.ratio(variants[0], v):.2f}x)" for v in variants]
        )
    lines = [
        "### Whole Keypoint R-CNN R50-FPN (one graph: backbone, RPN, box head, keypoints): "
        + ", ".join(variants),
        "",
        f"Command: `{command(__file__, argv)}`; {args.threads} thread(s), medians of "
        f"{args.rounds} interleaved rounds after one warm-up; ratio = {variants[0]} / variant. "
        "Random "
        "weights with trained scales, pre/post-NMS top-k 1000, score threshold 0.05; D = "
        "detections (the keypoint head runs on D boxes). OpenVINO with the f32 hint.",
        "",
        machine_line(),
        "",
        *md_table(["image", "D", *(f"{v} ms (x)" for v in variants)], rows),
        *(
            ["", "Speed-ups within the same rounds (median of per-round ratios):", *speedups]
            if speedups
            else []
        ),
        *(["", *notes] if notes else []),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    log(f"wrote {write_section(args.doc, text, key=args.key)}")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--full" in argv:
        full_main(argv)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rois", default="1,10,50,100")
    ap.add_argument(
        "--variants",
        default="eager,vectorized-ort,vectorized-ov,loop-ort,loop-ov",
        help="comma-separated: eager and <vectorized|pruned|loop>-<ort|ov>",
    )
    ap.add_argument(
        "--no-memory", action="store_true", help="skip peak RSS (it re-exports every graph)"
    )
    ap.add_argument(
        "--kinds",
        default="peaked",
        help="peaked,noise (noise at R=100 with "
        "large boxes drove the pruned form out of memory here)",
    )
    ap.add_argument("--json", help="also write raw results here")
    ap.add_argument("--doc", default=str(DOCS / "keypoints.md"), help="Markdown to write into")
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    mem_cols = [] if args.no_memory else variants
    fns = {v: make(v, args.threads) for v in variants}
    rows = []
    for kind in args.kinds.split(","):
        for r in (int(x) for x in args.rois.split(",")):
            log(f"{kind} heatmaps, R={r} ...")
            m, b = inputs(kind, r)
            # one warm-up call each (OpenVINO shapes, ORT allocations), then the rounds
            times = interleaved_timing(
                {v: (lambda f=fns[v], m=m, b=b: f(m, b)) for v in variants}, args.rounds, warmup=1
            )
            med = {v: times.median(v) for v in variants}
            ratio = {v: times.ratio("eager", v) for v in variants}
            mem = {v: peak_memory(v, kind, r, args.threads) for v in mem_cols}
            rows.append({"heatmaps": kind, "R": r, "ms": med, "ratio": ratio, "peak_mb": mem})
    head = ["heatmaps", "R", *(f"{v} ms (x)" for v in variants)]
    table = [
        [row["heatmaps"], row["R"]]
        + [f"{row['ms'][v]:.1f} ({row['ratio'][v]:.2f}x)" for v in variants]
        + [f"{row['peak_mb'][v]:.0f}" for v in mem_cols]
        for row in rows
    ]
    lines = [
        f"### Keypoint post-processing (K={K}, 56x56 maps, person boxes 100–500 px)",
        "",
        f"Command: `{command(__file__, argv)}`; medians of {args.rounds} interleaved rounds; "
        "ratio = eager / variant, median of the per-round ratios (> 1 is faster than the eager "
        "loop); peak = RSS growth in MB while running.",
        "",
        machine_line(),
        "",
        *md_table([*head, *(f"{v} peak" for v in mem_cols)], table),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    log(f"wrote {write_section(args.doc, text, key='measured')}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
