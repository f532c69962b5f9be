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


def full_main(argv: Sequence[str]) -> None:
    """``--full``: the whole Keypoint R-CNN R50-FPN graph (ORT, OpenVINO f32) vs eager PyTorch.

    Random weights with trained scales (``random_detectron2_state``); ``--person-bias`` sets
    how many proposals pass the 0.05 score threshold, i.e. the detection count D, which drives
    the 512-channel keypoint head's cost. The export has dynamic H, W: one graph for all sizes.
    ``--variants`` picks from eager, ort, ov (OpenVINO f32) and ov-int8 (NNCF INT8 of the
    backbone + FPN, :mod:`damo_plugins.keypoints.int8`, calibrated on ``--calib`` random
    images of the first size; its fidelity vs ov on two other random images is reported).
    Ratios are to the first variant.
    """
    from damo_plugins.keypoints.export import OPENVINO_F32_CONFIG, export_keypoint_model
    from damo_plugins.keypoints.rcnn import KeypointRCNN, random_detectron2_state

    ap = argparse.ArgumentParser(description=full_main.__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", default="800x1333,480x640", help="HxW,...")
    ap.add_argument("--person-bias", type=float, default=1.0)
    ap.add_argument("--variants", default="eager,ort,ov", help="eager,ort,ov,ov-int8")
    ap.add_argument("--calib", type=int, default=4, help="random calibration images (ov-int8)")
    ap.add_argument("--key", default="full-model", help="section of --doc to write")
    ap.add_argument("--doc", default=str(DOCS / "keypoints.md"), help="Markdown to write into")
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    unknown = set(variants) - {"eager", "ort", "ov", "ov-int8"}
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
    if "ov-int8" in variants:
        from damo_plugins.keypoints.int8 import compare_int8_model, quantize_keypoint_rcnn

        g = torch.Generator().manual_seed(1)
        h0, w0 = sizes[0]
        calib = [(torch.rand(1, 3, h0, w0, generator=g) * 255).numpy() for _ in range(args.calib)]
        held = [(torch.rand(1, 3, h0, w0, generator=g) * 255).numpy() for _ in range(2)]
        log(f"quantizing on {args.calib} random {h0}x{w0} images ...")
        t0 = time.perf_counter()
        q_model, info = quantize_keypoint_rcnn(proto, calib)
        log(f"quantized in {time.perf_counter() - t0:.0f} s: {info}")
        q_compiled = core.compile_model(q_model, "CPU", config)
        fid = compare_int8_model(proto, q_model, held, threads=args.threads)
        notes.append(
            f"ov-int8: {info['quantized_layers']} of {info['backbone_layers']} backbone/FPN "
            f"layers INT8 ({info['fake_quantize']} FakeQuantize), everything else float; "
            f"calibrated on {args.calib} random {h0}x{w0} images. Fidelity vs ov on 2 other "
            "random images (random weights, so only indicative): "
            + ", ".join(f"{k} {v:.3g}" for k, v in fid.items())
        )
    rows = []
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
        if "ov-int8" in variants:
            fns["ov-int8"] = lambda arr=arr: q_compiled({0: arr})
        times = interleaved_timing({v: fns[v] for v in variants}, args.rounds, warmup=1)
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
