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
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from common import (
    DOCS,
    Interleaved,
    apply_pass,
    command,
    interleaved_timing,
    log,
    machine_line,
    quiet,
    write_section,
)


def summarize(times: Interleaved[str], clock: str) -> tuple[float, float, float, float]:
    """Medians (ms) of unfused and fused, ratio of medians, median of per-round ratios."""
    return (
        times.median("unfused", clock),  # type: ignore[arg-type]
        times.median("fused", clock),  # type: ignore[arg-type]
        times.ratio_of_medians("unfused", "fused", clock),  # type: ignore[arg-type]
        times.ratio("unfused", "fused", clock),  # type: ignore[arg-type]
    )


def main(argv: Sequence[str] | None = None) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from damo_plugins.core.artifact import build_model
    from damo_plugins.core.manager import get_manager
    from damo_plugins.core.onnx_utils import ort_session

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--models", default="t,s,m")
    ap.add_argument("--output", default=str(DOCS / "reparam.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    mgr = get_manager()
    shape = [1, 3, args.size, args.size]
    x = torch.rand(*shape)
    feed = x.numpy()
    work = Path(".")
    rows_pt, rows_ort, rows_size = [], [], []
    for preset in args.models.split(","):
        name = f"damo-yolo-{preset}"
        log(f"{name}: building, fusing, exporting ...")
        art = build_model(name, mgr.get_model_builder(name), input_shape=shape)
        step = apply_pass(mgr, "reparam", {}, art, work, log=quiet).raise_if_failed()
        fused = step.artifact
        models = {"unfused": art.model.eval(), "fused": fused.model.eval()}
        sizes = {}
        for key, m in models.items():
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                m(x)
            sizes[key] = (
                sum(p.numel() for p in m.parameters()) / 1e6,
                counter.get_total_flops() / 1e9,
            )
        assert step.verification is not None
        rows_size.append((name, sizes, step.metrics, step.verification.metrics["max_rel"]))

        def eager(m: torch.nn.Module) -> Callable[[], object]:
            def run() -> object:
                with torch.no_grad():
                    return m(x)

            return run

        log(f"{name}: PyTorch eager ...")
        rows_pt.append(
            (
                name,
                interleaved_timing({k: eager(m) for k, m in models.items()}, args.rounds, warmup=2),
            )
        )

        sessions = {}
        for key, a in (("unfused", art), ("fused", fused)):
            proto = apply_pass(mgr, "export", {"opset": 17}, a, work, log=quiet).raise_if_failed()
            model = proto.artifact.model
            sessions[key] = (ort_session(model, threads=args.threads), len(model.graph.node))
        out_u = sessions["unfused"][0].run(None, {"images": feed})
        out_f = sessions["fused"][0].run(None, {"images": feed})
        ort_rel = max(float(np.abs(a - b).max() / np.abs(a).max()) for a, b in zip(out_u, out_f))

        def ort_run(sess: object) -> Callable[[], object]:
            return lambda: sess.run(None, {"images": feed})  # type: ignore[attr-defined]

        log(f"{name}: ONNX Runtime ...")
        times = interleaved_timing(
            {k: ort_run(s) for k, (s, _) in sessions.items()}, args.rounds, warmup=2
        )
        rows_ort.append((name, times, sessions["unfused"][1], sessions["fused"][1], ort_rel))

    lines = [
        "## reparam: unfused vs fused DAMO-YOLO latency",
        "",
        f"Command: `{command(__file__, argv)}`",
        "",
        machine_line(),
        "",
        f"{args.threads} thread(s); batch 1, {args.size}x{args.size}, random weights. Each round "
        f"runs both variants (alternating order); {args.rounds} rounds after 2 warm-up runs. "
        "`cpu` is this process's CPU time per inference (with one thread: the work done, "
        "without the time spent waiting for a core); `wall` is elapsed time.",
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
    log(f"written to {write_section(args.output, text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
