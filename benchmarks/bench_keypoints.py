"""Keypoint post-processing: exported graphs (ONNX Runtime, OpenVINO) vs the eager per-ROI loop.

Run: ``python benchmarks/bench_keypoints.py [--rounds 5] [--threads 2]``; prints Markdown.
Variants are interleaved round by round; medians and ratios to the eager loop are reported.
Heatmaps: "peaked" (a Gaussian blob plus noise per keypoint, what a trained head produces)
and "noise" (i.i.d. normal logits, the pruned form's worst case). Peak memory is the growth
of the process's max RSS while running, measured in a fresh subprocess per variant.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

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
        "import sys; sys.path.insert(0, 'benchmarks'); import bench_keypoints as b;"
        f"f = b.make({variant!r}, {threads}); m, r = b.inputs({kind!r}, {r});"
        "print(b.measure_peak(f, m, r))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rois", default="1,10,100")
    ap.add_argument(
        "--kinds",
        default="peaked",
        help="peaked,noise (noise at R=100 with "
        "large boxes drove the pruned form out of memory here)",
    )
    ap.add_argument("--json", help="also write raw results here")
    args = ap.parse_args()
    variants = ["eager", "pruned-ort", "pruned-ov", "loop-ort", "loop-ov"]
    fns = {v: make(v, args.threads) for v in variants}
    rows = []
    for kind in args.kinds.split(","):
        for r in (int(x) for x in args.rois.split(",")):
            m, b = inputs(kind, r)
            times: dict[str, list[float]] = {v: [] for v in variants}
            for v in variants:
                fns[v](m, b)  # warm-up (OpenVINO shapes, ORT allocations)
            for _ in range(args.rounds):
                for v in variants:
                    t = time.perf_counter()
                    fns[v](m, b)
                    times[v].append((time.perf_counter() - t) * 1e3)
            med = {v: statistics.median(t) for v, t in times.items()}
            mem = {v: peak_memory(v, kind, r, args.threads) for v in variants}
            rows.append({"heatmaps": kind, "R": r, "ms": med, "peak_mb": mem})
    print(f"### Keypoint post-processing (K={K}, 56x56 maps, person boxes 100–500 px)\n")
    print(
        f"`python benchmarks/bench_keypoints.py --rounds {args.rounds} --threads "
        f"{args.threads}`; medians of {args.rounds} interleaved rounds; ratio = eager / variant "
        "(> 1 is faster than the eager loop); peak = RSS growth in MB while running.\n"
    )
    print(
        "| heatmaps | R | "
        + " | ".join(f"{v} ms (x)" for v in variants)
        + " | "
        + " | ".join(f"{v} peak" for v in variants)
        + " |"
    )
    print("|---|---|" + "---|" * (2 * len(variants)))
    for row in rows:
        eager = row["ms"]["eager"]
        cells = [f"{row['ms'][v]:.1f} ({eager / row['ms'][v]:.2f}x)" for v in variants]
        mems = [f"{row['peak_mb'][v]:.0f}" for v in variants]
        print(f"| {row['heatmaps']} | {row['R']} | " + " | ".join(cells + mems) + " |")
    print(f"\nload average at the end: {[round(x, 1) for x in os.getloadavg()]}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
