"""What the two deployment rewrites buy, measured side by side on the demo's models.

    python benchmarks/bench_deploy_rewrites.py [--rounds 12] [--output docs/benchmarks/deploy_rewrites.md]

The rewrites (both exact up to float32 summation order):

* **Focus fold** (``reparam``'s ``space_to_depth``): the stem's four strided slices +
  concat + k x k conv become one 2k x 2k conv of stride 2 on the image;
* **per-level decode** (:class:`damo_plugins.models.head.ZeroHead`): the bins' softmax and
  expectation run in the convolutions' layout, anchors innermost, instead of on the
  flattened ``[N, A, 4, bins]`` tensor training uses.

For the embedded model and its shipped pruned version, three variants go through the demo's
own chain (``reparam -> export -> convert -> quantize``, :func:`damo_plugins.demo.demo_recipes`'
options, each step verified): **before** (no Focus fold, the flattened decode — rebuilt here
from ``forward_levels`` as the reference), **+ Focus fold**, and **both** (what the package
does now). Then:

* one ``compare`` call over all FP32 and INT8 IRs: mAP on the demo's held-out images and
  latency in OpenVINO at f32, interleaved rounds, speed-ups against the original model;
* OpenVINO's per-operation counters (``PERF_COUNT``) for each INT8 IR, summed by operation
  type: where an inference's time goes, and which part each rewrite removes.

The Markdown is printed and written to ``docs/benchmarks/deploy_rewrites.md``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from common import (
    DOCS,
    apply_pass,
    command,
    log,
    machine,
    machine_line,
    md_table,
    quiet,
    write_section,
)
from torch import nn

from damo_plugins.core.artifact import ModelArtifact, load_model
from damo_plugins.core.manager import get_manager
from damo_plugins.models.head import distances_to_boxes

VARIANTS = ("before", "+ Focus fold", "both (now)")


class FlattenedDecode(nn.Module):
    """The head as it decoded before the per-level layout: the reference for "before"."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        cls, reg, points, strides = self.head.forward_levels(feats)
        dist = torch.matmul(reg.softmax(dim=-1), self.head.integral.project) * strides
        return cls.sigmoid(), distances_to_boxes(points, dist)


def build(art: ModelArtifact, variant: str, tail: list[Any], work: Path) -> tuple[Path, Path]:
    """FP32 and INT8 OpenVINO IRs of ``art`` in ``variant``, through the passes, saved."""
    mgr = get_manager()
    fold = variant != "before"
    fused = apply_pass(mgr, "reparam", {"space_to_depth": fold}, art, work / "reparam", log=quiet)
    model = fused.artifact
    if variant != "both (now)":
        model.model.head = FlattenedDecode(model.model.head)
    current = model
    results = {}
    for step in tail:
        ((name, options),) = step.items()
        res = apply_pass(mgr, name, options, current, work / name, log=quiet)
        if res.verification is not None and not res.verification.passed:
            raise SystemExit(f"{variant}: {name} failed its check: {res.verification.message}")
        current = results[name] = res.artifact
    return results["convert"].save(work / "f32"), results["quantize"].save(work / "int8")


def op_profile(xml: str, runs: int = 300) -> dict[str, float]:
    """Microseconds per inference by OpenVINO operation type (compiled by the OpenVINO
    adapter as ``compare`` times it: f32, latency hint; batch 1): for each type the median
    over ``runs`` inferences, robust to the odd slow one."""
    import statistics

    import numpy as np

    art = load_model(xml)
    compiled = (
        get_manager()
        .get_adapter("openvino")
        .compile(art, "CPU", hint="latency", properties={"PERF_COUNT": "YES"})
    )
    req = compiled.create_infer_request()
    x = np.random.default_rng(0).random(art.input_shape, dtype=np.float32) * 255
    per_run: dict[str, list[float]] = defaultdict(lambda: [0.0] * runs)
    for _ in range(20):
        req.infer({0: x})
    for i in range(runs):
        req.infer({0: x})
        for p in req.get_profiling_info():
            per_run[p.node_type][i] += p.real_time.total_seconds() * 1e6
    return {kind: statistics.median(v) for kind, v in per_run.items()}


def main(argv: Sequence[str] | None = None) -> int:
    from damo_plugins.demo import (
        DEFAULT,
        DEMO_SEED,
        _folder,
        demo_recipes,
        embedded_checkpoint,
        shipped_pruned,
    )
    from damo_plugins.optimize.compare import compare

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--output", default=str(DOCS / "deploy_rewrites.md"))
    args = ap.parse_args(argv)

    data = _folder(DEFAULT.data, DEMO_SEED)  # the demo's own data: calibration and held-out
    original = embedded_checkpoint()
    pruned = shipped_pruned(original)
    if original is None or pruned is None:
        raise SystemExit("the embedded model or its shipped pruned version is missing")
    tail = demo_recipes(str(original), data)["int8"]["steps"][1:]
    models: dict[str, str] = {"original": str(original)}
    with tempfile.TemporaryDirectory(prefix="damo-rewrites-") as tmp:
        for label, ckpt in (("", original), ("pruned ", pruned[0])):
            art = load_model(str(ckpt))
            for variant in VARIANTS:
                log(f"building {label}{variant} ...")
                work = Path(tmp) / f"{label.strip() or 'orig'}-{VARIANTS.index(variant)}"
                f32, int8 = build(art, variant, tail, work)
                models[f"{label}{variant} · f32"] = str(f32)
                models[f"{label}{variant} · INT8"] = str(int8)
        log(f"comparing {len(models)} models ({args.rounds} rounds) ...")
        rows = compare(list(models.values()), data, rounds=args.rounds, log=quiet)
        profiles = {
            name: op_profile(path) for name, path in models.items() if name.endswith("INT8")
        }
    info = machine()
    lines = [
        "## Deployment rewrites: Focus fold and per-level decode",
        "",
        f"Command: `{command(__file__, argv)}`",
        "",
        machine_line(info, shared=False),
        "",
        f"Every row measured by one `compare` call: mAP@[.5:.95] on the demo's {rows[0]['images']}"
        " held-out images, latency batch 1 in **OpenVINO CPU at f32** (INT8 rows: INT8"
        f" convolutions, decode in f32), median of {args.rounds} interleaved rounds (lowest–"
        "highest round), speed-up = median of per-round ratios against the original.",
        "Variants, each through the demo's chain (reparam -> export -> convert -> NNCF INT8):"
        " **before** = Focus stem as slicing + conv, decode on the flattened `[N, A, 4, bins]`"
        " tensor (the package until this benchmark); **+ Focus fold** = `reparam` folds the"
        " stem into one stride-2 conv; **both (now)** = that and the per-level decode, what"
        " `reparam` and the head do now. **pruned** rows start from the shipped pruned model.",
        "",
    ]
    table = []
    for (name, _path), row in zip(models.items(), rows):
        spread = row["latency_rounds_ms"]
        table.append(
            [
                name,
                f"{100 * row['mAP']:.2f}",
                f"{row['latency_ms']:.2f} ({min(spread):.2f}–{max(spread):.2f})",
                f"{row['speedup']:.2f}x",
            ]
        )
    lines += md_table(["model", "mAP", "latency ms (rounds)", "speed-up"], table)
    kinds = sorted(
        {k for p in profiles.values() for k in p},
        key=lambda k: -max(p.get(k, 0) for p in profiles.values()),
    )
    top = [k for k in kinds if max(p.get(k, 0) for p in profiles.values()) >= 20]
    lines += [
        "",
        "INT8 IRs, OpenVINO's per-operation counters (µs per inference summed by operation"
        " type, median of 300 runs each; types under 20 µs everywhere are in 'other'; the sum"
        " is of the medians):",
        "",
    ]
    head = ["operation", *profiles]
    body = []
    for k in top:
        body.append([k, *(f"{p.get(k, 0):.0f}" for p in profiles.values())])
    body.append(
        [
            "other",
            *(f"{sum(v for t, v in p.items() if t not in top):.0f}" for p in profiles.values()),
        ]
    )
    body.append(["**sum**", *(f"**{sum(p.values()):.0f}**" for p in profiles.values())])
    lines += md_table(head, body)
    text = "\n".join(lines) + "\n"
    print(text)
    # keyed: the hand-written reading below the block survives a re-run
    write_section(args.output, text, key="demo-models-256")
    return 0


if __name__ == "__main__":
    sys.exit(main())
