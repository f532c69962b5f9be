"""Latency of DAMO-YOLO-T/S/M before and after ``reparam``, in PyTorch eager and ONNX Runtime.

    python benchmarks/bench_reparam.py [--rounds 7] [--threads 2] [--size 640] [--models t,s,m]

For each model the unfused and the fused (``reparam``, mode ``auto``: RepConvs deployed and
every Conv+BN folded) versions run *interleaved*: each round times one inference of each,
in alternating order, so that load from other processes hits both alike. We report the
median latency of each and two ratios: of the medians, and the median of the per-round
ratios (the more robust one on a shared machine). Random weights: latency does not depend on
them. Prints a Markdown section and writes it to ``docs/benchmarks/reparam.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def interleaved(
    fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 2
) -> dict[str, dict[str, list[float]]]:
    """Run each function once per round, alternating the order.

    Returns seconds per call, wall clock (``wall``) and CPU time of this process (``cpu``):
    with one thread, CPU time counts the work done and not the time spent waiting for a
    core, which is what dominates wall clock on a shared, oversubscribed machine.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[n]()
            times[n]["wall"].append(time.perf_counter() - t0)
            times[n]["cpu"].append(time.process_time() - c0)
    return times


def summarize(times: dict[str, dict[str, list[float]]], clock: str) -> tuple[float, ...]:
    """Medians (ms) of unfused and fused, ratio of medians, median of per-round ratios."""
    base, fused = times["unfused"][clock], times["fused"][clock]
    med_b, med_f = statistics.median(base), statistics.median(fused)
    per_round = statistics.median(b / f for b, f in zip(base, fused))
    return med_b * 1e3, med_f * 1e3, med_b / med_f, per_round


def main(argv: list[str] | None = None) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from damo_plugins.core.artifact import build_model
    from damo_plugins.core.manager import get_manager
    from damo_plugins.core.onnx_utils import ort_session
    from damo_plugins.core.passes import PassContext
    from damo_plugins.lib.onnx_export import export_onnx
    from damo_plugins.plugins.reparam import ReparamPass

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--models", default="t,s,m")
    ap.add_argument("--output", default=str(ROOT / "docs" / "benchmarks" / "reparam.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    mgr = get_manager()
    shape = [1, 3, args.size, args.size]
    x = torch.rand(*shape)
    feed = x.numpy()
    rows_pt, rows_ort, rows_size = [], [], []
    for preset in args.models.split(","):
        name = f"damo-yolo-{preset}"
        print(f"{name}: building, fusing, exporting ...", file=sys.stderr, flush=True)
        art = build_model(name, mgr.get_model_builder(name), input_shape=shape)
        ctx = PassContext(manager=mgr, workdir=Path("."), log=lambda _m: None)
        step = ReparamPass()
        fused = step.run(art, ctx)
        ver = step.verify(art, fused, ctx)
        models = {"unfused": art.model.eval(), "fused": fused.model.eval()}
        sizes = {}
        for key, m in models.items():
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                m(x)
            sizes[key] = (
                sum(p.numel() for p in m.parameters()) / 1e6,
                counter.get_total_flops() / 1e9,
            )
        rows_size.append((name, sizes, ctx.extra, ver.metrics["max_rel"]))

        def eager(m: torch.nn.Module) -> Callable[[], object]:
            def run() -> object:
                with torch.no_grad():
                    return m(x)

            return run

        print(f"{name}: PyTorch eager ...", file=sys.stderr, flush=True)
        rows_pt.append((name, interleaved({k: eager(m) for k, m in models.items()}, args.rounds)))

        sessions = {}
        for key, a in (("unfused", art), ("fused", fused)):
            proto = export_onnx(a, opset=17)
            sessions[key] = (ort_session(proto, threads=args.threads), len(proto.graph.node))
        out_u = sessions["unfused"][0].run(None, {"images": feed})
        out_f = sessions["fused"][0].run(None, {"images": feed})
        ort_rel = max(float(np.abs(a - b).max() / np.abs(a).max()) for a, b in zip(out_u, out_f))

        def ort_run(sess: object) -> Callable[[], object]:
            return lambda: sess.run(None, {"images": feed})  # type: ignore[attr-defined]

        print(f"{name}: ONNX Runtime ...", file=sys.stderr, flush=True)
        times = interleaved({k: ort_run(s) for k, (s, _) in sessions.items()}, args.rounds)
        rows_ort.append((name, times, sessions["unfused"][1], sessions["fused"][1], ort_rel))

    import onnxruntime

    lines = [
        "## reparam: unfused vs fused DAMO-YOLO latency",
        "",
        f"Command: `python benchmarks/bench_reparam.py --rounds {args.rounds} --threads {args.threads} "
        f"--size {args.size} --models {args.models}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} vCPU, "
        f"{args.threads} thread(s); torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; "
        f"batch 1, {args.size}x{args.size}, random weights. Each round runs both variants "
        f"(alternating order); {args.rounds} rounds after 2 warm-up runs. **The machine was "
        "shared with other jobs while this ran: absolute milliseconds are noisy; the ratios, "
        "measured side by side, are the figures to read. `cpu` is this process's CPU time per "
        "inference (with one thread: the work done, without the time spent waiting for a "
        "core); `wall` is elapsed time.**",
        "",
        "### Size (what `reparam` removes)",
        "",
        "| model | params unfused (M) | params fused (M) | GFLOPs unfused | GFLOPs fused | RepConvs | Conv+BN folded | BN left | max rel. error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, sizes, extra, rel in rows_size:
        (pu, fu), (pf, ff) = sizes["unfused"], sizes["fused"]
        lines.append(
            f"| {name} | {pu:.3f} | {pf:.3f} | {fu:.2f} | {ff:.2f} | {extra['repconv_deployed']} | "
            f"{extra['conv_bn_folded']} | {extra['bn_remaining']} | {rel:.1e} |"
        )
    header = (
        "| model | clock | unfused median ms | fused median ms | ratio of medians "
        "| median per-round ratio |"
    )
    lines += ["", "### PyTorch eager", "", header, "|---|---|---|---|---|---|"]
    for name, times in rows_pt:
        for clock in ("cpu", "wall"):
            mu, mf, r, pr = summarize(times, clock)
            lines.append(f"| {name} | {clock} | {mu:.0f} | {mf:.0f} | {r:.2f}x | {pr:.2f}x |")
    lines += [
        "",
        "### ONNX Runtime (exports of the same two models, opset 17)",
        "",
        header,
        "|---|---|---|---|---|---|",
    ]
    for name, times, _, _, _ in rows_ort:
        for clock in ("cpu", "wall"):
            mu, mf, r, pr = summarize(times, clock)
            lines.append(f"| {name} | {clock} | {mu:.0f} | {mf:.0f} | {r:.2f}x | {pr:.2f}x |")
    lines += ["", "| model | ONNX nodes unfused / fused | max rel. diff fused vs unfused (ORT) |"]
    lines.append("|---|---|---|")
    for name, _, nu, nf, rel in rows_ort:
        lines.append(f"| {name} | {nu} / {nf} | {rel:.1e} |")
    pt = [summarize(t, "cpu")[3] for _, t in rows_pt]
    ort = [summarize(t, "cpu")[3] for _, t, _, _, _ in rows_ort]
    lines += [
        "",
        "### Reading",
        "",
        f"- PyTorch eager, CPU time per inference: the fused models are {min(pt):.2f}x to "
        f"{max(pt):.2f}x faster (median per-round ratio). Fusion removes the 1x1 branch conv, "
        "the branch add and two BNs of every RepConv, and every other BN; the convolutions, "
        "which dominate a CPU inference, stay (GFLOPs drop 3.5-5 %), so the gain comes mostly "
        "from the element-wise passes over large feature maps that disappear.",
        f"- ONNX Runtime: {min(ort):.2f}x to {max(ort):.2f}x. The ONNX export of the *unfused* "
        "model already has no BatchNormalization node (the TorchScript exporter folds BN into "
        "the conv in eval mode), so there `reparam` saves only the 1x1 branch Conv and the Add "
        "of each RepConv (the node counts above).",
        "- Wall-clock ratios are shown for completeness; with other jobs competing for the two "
        "cores they swing from run to run; CPU time is the more repeatable measure.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
