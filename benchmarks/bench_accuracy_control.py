"""Plain INT8 vs accuracy-controlled INT8 (``max_drop``) on the trained DAMO-YOLO nano, by mAP.

    python benchmarks/bench_accuracy_control.py

The ``quantize`` pass takes ``max_drop`` with a labelled ``val:`` set: the drop is then an
absolute COCO mAP@[.5:.95] drop, enforced by NNCF's ``quantize_with_accuracy_control`` (it
reverts the quantizers that hurt most back to floating point) or INC's ``autotune`` (it tries
other quantization configs). This script shows what that buys on the shipped model
(``damo_plugins/assets/damo-yolo-nano-synth.pt``, fused with the ``reparam`` pass first, as
the compression table does):

* **data** (all generated, none of it trained on: the model saw seed 0's train split):
  calibration = synthetic train images of seed 1; the accuracy-control set = the first
  ``--val-images`` val images of seed 1 (what ``max_drop`` is checked against); the reported
  mAP = ``--eval-images`` val images of seed 2, *held out* from the accuracy control, so a
  setting that only fits the control set shows up here;
* **rows**: NNCF -> OpenVINO plain and with each ``--nncf-drops``; INC -> OpenVINO plain and
  with each ``--inc-drops``; ONNX Runtime plain (and once with ``max_drop``, which it refuses:
  it has no accuracy control). A row whose backend cannot meet ``max_drop`` records the
  error instead of stopping the script;
* ``--nncf-pinned-drops`` (diagnostic, off by default): NNCF rows run with OpenVINO's CPU
  default inference precision set to f32 for the whole quantize step. It found a bug, now
  fixed: the NNCF adapter re-measured the FP32 and INT8 models at the CPU default (bf16 on
  AVX512-BF16/AMX CPUs) while NNCF measures at f32, and rejected results NNCF had accepted;
* per row: mAP on the held-out set (the ``evaluate`` pass's code; OpenVINO at f32, ONNX
  Runtime for its QDQ model), mAP on the control set (the pass's verification, measured on
  the deployed models), the adapter's own metric report, INT8 quantizer count (OpenVINO
  ``FakeQuantize`` / ONNX ``QuantizeLinear``), decode ops kept in FP, wall time of the
  quantize step alone (``Pass.run``, verification excluded).

One torch thread (the machine is shared, 2 cores). Writes ``docs/benchmarks/accuracy_control.md``;
``python benchmarks/collect.py`` puts it into ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    DOCS,
    apply_pass,
    command,
    machine,
    machine_line,
    packaged_checkpoint,
    verdict,
    write_section,
)
from common import log as _log

from damo_plugins.core.artifact import ModelArtifact, load_model
from damo_plugins.core.errors import DamoError
from damo_plugins.core.manager import PluginManager, get_manager
from damo_plugins.core.passes import PassContext
from damo_plugins.core.runner import run_step
from damo_plugins.data.evaluate import dataset_for, evaluate_artifact
from damo_plugins.data.validation import LabelledDetections
from damo_plugins.plugins.evaluate import EvaluateConfig

DOC = DOCS / "accuracy_control.md"


@dataclass
class Spec:
    """One quantization run: which adapter, which max_drop, under which OpenVINO default."""

    key: str
    label: str
    adapter: str
    max_drop: float | None = None
    pin_f32: bool = False


@dataclass
class Result:
    """What one run produced (or the error it stopped with)."""

    spec: Spec
    ok: bool
    seconds: float
    error: str = ""
    quant: dict[str, Any] = field(default_factory=dict)  # the adapter's metrics
    check: dict[str, Any] = field(default_factory=dict)  # the pass's verification metrics
    check_ok: bool | None = None
    heldout: float | None = None  # mAP@[.5:.95] on the held-out set
    inc_trials: int | None = None


# ------------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def ov_cpu_precision(value: str | None) -> Iterator[None]:
    """Set the CPU default inference precision of the project's OpenVINO core, then restore it.

    Models compiled with an explicit hint (the adapter's ``compile``, NNCF's own validation)
    are unaffected; this only changes what a bare ``core().compile_model(m, "CPU")`` runs at.
    """
    if value is None:
        yield
        return
    from damo_plugins.lib.openvino_graph import ov_core as shared_core

    ov_core = shared_core()
    old = ov_core.get_property("CPU", "INFERENCE_PRECISION_HINT")
    ov_core.set_property("CPU", {"INFERENCE_PRECISION_HINT": value})
    try:
        yield
    finally:
        ov_core.set_property("CPU", {"INFERENCE_PRECISION_HINT": old})


@contextlib.contextmanager
def counting_map_evaluations() -> Iterator[list[int]]:
    """Count calls of ``LabelledDetections.score`` (behaviour unchanged).

    The INC adapter scores every candidate model with it: its own FP32 baseline, INC's
    baseline, one call per autotune trial, and a final re-check of the chosen model. The
    adapter does not report the number of trials, so it is read off this count.
    """
    calls = [0]
    original = LabelledDetections.score

    def score(self: LabelledDetections, *args: Any, **kwargs: Any) -> float:
        calls[0] += 1
        return original(self, *args, **kwargs)

    LabelledDetections.score = score  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        LabelledDetections.score = original  # type: ignore[method-assign]


def quantize_row(
    mgr: PluginManager,
    spec: Spec,
    src: ModelArtifact,
    config: dict[str, Any],
    workdir: Path,
    heldout: tuple[Any, EvaluateConfig],
) -> Result:
    """Apply the ``quantize`` pass through the step runner, as the pipeline does.

    Only the pass's ``run`` happens under the row's conditions (OpenVINO's CPU default pinned
    to f32 for the pinned rows) and with mAP evaluations counted (INC's autotune trials):
    the verification that follows is the same for every row and is not an autotune trial.
    """
    pass_ = mgr.get_pass("quantize")(config)
    counting = spec.adapter == "inc" and spec.max_drop is not None
    calls = [0]
    quantize = pass_.run

    def run(art: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        with (
            ov_cpu_precision("f32" if spec.pin_f32 else None),
            counting_map_evaluations() as counted,
        ):
            try:
                return quantize(art, ctx)
            finally:
                calls[0] = counted[0]

    pass_.run = run  # type: ignore[method-assign]
    ctx = PassContext(manager=mgr, workdir=workdir, seed=0, log=_log)
    t0 = time.perf_counter()
    try:
        step = run_step(pass_, src, ctx)
    except DamoError as exc:
        message = exc.message.splitlines()[0] if exc.message else type(exc).__name__
        res = Result(spec, False, time.perf_counter() - t0, error=message)
        if counting and "found no configuration" in res.error:
            res.inc_trials = calls[0] - 2  # two baselines, then one call per trial
        _log(f"  {spec.key}: {res.error}")
        return res
    res = Result(spec, True, step.seconds, quant=dict(step.metrics.get("quantization") or {}))
    if counting:
        res.inc_trials = calls[0] - 3  # two baselines and the final re-check
    assert step.verification is not None
    res.check, res.check_ok = dict(step.verification.metrics), step.passed
    dataset, cfg = heldout
    res.heldout = evaluate_artifact(step.artifact, dataset, cfg, mgr)["mAP"]
    _log(
        f"  {spec.key}: {step.seconds:.0f} s, held-out mAP {res.heldout:.4f}; check {verdict(step)}"
    )
    return res


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _f4(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "—"


def _signed(value: Any) -> str:
    return f"{value:+.4f}" if isinstance(value, (int, float)) else "—"


# ------------------------------------------------------------------------------ report
def _quantizers(r: Result) -> int | None:
    q = r.quant
    return q.get("fake_quantize", q.get("quantize_linear"))


def table(results: list[Result], fp32_heldout: float, fp32_control: float) -> list[str]:
    plain = {r.spec.adapter: r for r in results if r.spec.max_drop is None and r.ok}
    head = [
        "row",
        "max_drop",
        "outcome",
        "quantize s",
        "INT8 quantizers (Δ vs plain)",
        "decode kept FP",
        "control set: INT8 mAP (drop)",
        "adapter's metric FP32 → INT8",
        "held-out: INT8 mAP",
        "held-out drop",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append(
        f"| FP32 (fused, OpenVINO f32) | — | — | — | — | — | {fp32_control:.4f} | — "
        f"| {fp32_heldout:.4f} | — |"
    )
    for r in results:
        s = r.spec
        drop = "— (plain)" if s.max_drop is None else f"{s.max_drop:g}"
        if not r.ok:
            outcome = "**error**: " + r.error.replace("|", "\\|")
            cells = [s.label, drop, outcome, f"{r.seconds:.0f}", "—", "—", "—", "—", "—", "—"]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        n = _quantizers(r)
        base = plain.get(s.adapter)
        base_n = _quantizers(base) if base is not None else None
        delta = (
            f" ({n - base_n:+d})" if n is not None and base_n is not None and base is not r else ""
        )
        kept = len(r.quant.get("kept_fp") or [])
        outcome = "ok" if r.check_ok else "ok (INT8 check failed)"
        if r.inc_trials is not None:
            outcome += f", {r.inc_trials} autotune trial(s)"
        c = r.check
        control = (
            f"{c['mAP_int8']:.4f} ({c['mAP_fp32'] - c['mAP_int8']:+.4f})"
            if "mAP_int8" in c
            else "—"
        )
        q = r.quant
        adapter_metric = (
            f"{q['metric_fp32']:.4f} → {q['metric_int8']:.4f}" if "metric_int8" in q else "—"
        )
        cells = [
            s.label,
            drop,
            outcome,
            f"{r.seconds:.0f}",
            f"{n if n is not None else '—'}{delta}",
            str(kept),
            control,
            adapter_metric,
            _f4(r.heldout),
            _signed(None if r.heldout is None else fp32_heldout - r.heldout),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _control_drop(r: Result) -> float:
    return float(r.check["mAP_fp32"] - r.check["mAP_int8"])


def notes(
    results: list[Result], fp32_heldout: float, fp32_control: float, default_precision: str
) -> list[str]:
    """Observations computed from the results, so that a re-run writes true ones.

    At most one line per topic: measurement noise, NNCF, the NNCF adapter's precision
    mismatch (when a row shows it), INC autotune, ONNX Runtime.
    """
    out: list[str] = []
    ok = [r for r in results if r.ok and r.heldout is not None and "mAP_int8" in r.check]
    plain = {r.spec.adapter: r for r in ok if r.spec.max_drop is None}
    gap = (
        max(abs(_control_drop(r) - (fp32_heldout - r.heldout)) for r in ok)  # type: ignore[operator]
        if ok
        else None
    )

    def versus(before: float, after: float) -> str:
        """A held-out change, set against the control/held-out spread measured above."""
        gain = before - after
        if gap is None:
            return ""
        size = "smaller" if abs(gain) < gap else "larger"
        what = f"{gain:.4f} better" if gain >= 0 else f"{-gain:.4f} worse"
        return f" ({what}, {size} than that {gap:.4f} spread)"

    if plain:
        parts = [
            f"{r.spec.label} {_control_drop(r):+.4f} (control) / "
            f"{fp32_heldout - r.heldout:+.4f} (held out)"  # type: ignore[operator]
            for r in plain.values()
        ]
        out.append(
            "- Plain INT8 mAP drops: "
            + "; ".join(parts)
            + f". One model's drop on the control set and on the held-out set differ by up to "
            f"{gap:.4f} across the rows: a `max_drop` finer than that is a statement about "
            "the control images more than about the model."
        )
    # NNCF (successful accuracy-control rows)
    base = plain.get("nncf")
    nncf = [r for r in ok if r.spec.adapter == "nncf" and r.spec.max_drop is not None]
    if base is not None and nncf:
        n0 = _quantizers(base)
        parts = []
        for r in nncf:
            n = _quantizers(r)
            where = ", OpenVINO default pinned to f32" if r.spec.pin_f32 else ""
            head = f"`max_drop {r.spec.max_drop:g}`{where} ({r.seconds:.0f} s vs {base.seconds:.0f} s plain)"
            if n is None or n0 is None or n == n0:
                parts.append(
                    f"{head}: plain INT8 was already within it on the control set, so NNCF "
                    "validated both models and returned the plain one"
                )
            else:
                parts.append(
                    f"{head}: reverted {n0 - n} of {n0} quantizers to FP; control-set drop "
                    f"{_control_drop(base):.4f} → {_control_drop(r):.4f}, held-out drop "
                    f"{fp32_heldout - base.heldout:.4f} → {fp32_heldout - r.heldout:.4f}"  # type: ignore[operator]
                    + versus(fp32_heldout - base.heldout, fp32_heldout - r.heldout)  # type: ignore[operator]
                )
        out.append("- NNCF: " + "; ".join(parts) + ".")
    # NNCF rows the adapter rejected
    pinned = {r.spec.max_drop: r for r in ok if r.spec.pin_f32}
    for r in results:
        if r.ok or r.spec.adapter != "nncf" or r.spec.max_drop is None:
            continue
        found = re.search(r"FP32 ([0-9.]+), best INT8 ([0-9.]+) \(drop ([-0-9.]+)\)", r.error)
        if found is None:
            out.append(f"- NNCF `max_drop {r.spec.max_drop:g}` failed: {r.error}")
            continue
        fp32, int8, drop = found.groups()
        line = (
            f"- NNCF `max_drop {r.spec.max_drop:g}` **failed** after {r.seconds:.0f} s: "
            f"the adapter measured FP32 {fp32} → INT8 {int8} (drop {drop}) on the control set."
        )
        twin = pinned.get(r.spec.max_drop)
        if twin is not None:
            line += (
                " With that default pinned to f32 the same run succeeds (the pinned row): NNCF "
                "had met the target and the adapter's re-check threw the result away."
            )
        out.append(line)
    # INC autotune
    inc = [r for r in results if r.spec.adapter == "inc" and r.spec.max_drop is not None]
    if inc:
        parts = []
        for r in inc:
            head = f"`max_drop {r.spec.max_drop:g}` ({r.seconds:.0f} s)"
            if not r.ok:
                parts.append(f"{head}: {r.error}")
                continue
            configs = (r.quant.get("autotune") or {}).get("configs") or []
            k = r.inc_trials
            chosen = (
                f", stopped at trial {k} ({json.dumps(configs[k - 1]) if configs[k - 1] else 'default'})"
                if k and 0 < k <= len(configs)
                else ""
            )
            inc_plain = plain.get("inc")
            change = (
                versus(fp32_heldout - inc_plain.heldout, fp32_heldout - r.heldout)  # type: ignore[operator]
                if inc_plain is not None and r.heldout != inc_plain.heldout
                else ""
            )
            parts.append(
                f"{head}: INC-side mAP {_f4(r.quant.get('metric_fp32'))} → "
                f"{_f4(r.quant.get('metric_int8'))}{chosen}; held-out drop "
                f"{fp32_heldout - r.heldout:+.4f}{change}"  # type: ignore[operator]
            )
        space = next(((r.quant.get("autotune") or {}).get("configs") for r in inc if r.ok), None)
        order = (
            " (configs in order: "
            + ", ".join(json.dumps(c) if c else "default" for c in space)
            + ")"
            if space
            else ""
        )
        out.append(
            "- INC autotune scores each candidate as an eager PyTorch INT8 model and stops at "
            f"the first config within `max_drop`{order}: " + "; ".join(parts) + "."
        )
    for r in results:
        if r.spec.adapter == "onnxruntime" and r.spec.max_drop is not None and not r.ok:
            out.append(
                f"- ONNX Runtime has no accuracy control: with `max_drop` the pass stops at once "
                f"(“{r.error}”); its plain row is the only ONNX Runtime result."
            )
    return out


def markdown(
    results: list[Result],
    fp32_heldout: float,
    fp32_control: float,
    args: argparse.Namespace,
    argv: Sequence[str],
    info: dict[str, Any],
    origin: str,
    seconds: float,
) -> str:
    lines = [
        "## Accuracy-controlled INT8 (`max_drop` on COCO mAP)",
        "",
        f"Command (took {seconds / 60:.1f} min): `{command(__file__, argv)}`",
        "",
        machine_line(info) + f" torch threads: {args.threads}.",
        "",
        f"Model: {origin}, fused with the `reparam` pass; NNCF and ONNX Runtime quantize its "
        "ONNX export (NNCF after conversion to OpenVINO IR), INC the PyTorch model. Data, all "
        f"generated and never trained on: calibration {args.calib} synthetic train images "
        f"(seed {args.calib_seed}); **control set** = the {args.val_images} val images of seed "
        f"{args.val_seed} given as `val:` (what `max_drop` is checked on, absolute mAP@[.5:.95]); "
        f"**held-out** = {args.eval_images} val images of seed {args.eval_seed}. mAP@[.5:.95] "
        "as a fraction (0.005 = 0.5 points). Control-set mAP is the pass's verification on the "
        "deployed models (OpenVINO f32 / ONNX Runtime / PyTorch for INC's FP32 source); "
        "held-out mAP is the `evaluate` pass's code (OpenVINO f32, ONNX Runtime for the QDQ "
        'model). "adapter\'s metric" is what the adapter reports from its own accuracy-control '
        'measurement. "quantize s" is the wall time of `Pass.run` (quantization and accuracy '
        "control, without verification). INT8 quantizers: `FakeQuantize` in the OpenVINO IR, "
        "`QuantizeLinear` in the QDQ model; decode kept FP: the adapter's count (ops for NNCF "
        "and ONNX Runtime, removed observers for INC).",
        "",
        *table(results, fp32_heldout, fp32_control),
        "",
        "Notes:",
        "",
        *notes(
            results, fp32_heldout, fp32_control, str(info.get("ov_cpu_default_precision") or "?")
        ),
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="damo-plugins .pt (default: the packaged trained model)")
    p.add_argument("--val-images", type=int, default=48, help="control-set images (max_drop)")
    p.add_argument("--val-seed", type=int, default=1)
    p.add_argument("--eval-images", type=int, default=150, help="held-out images for mAP")
    p.add_argument("--eval-seed", type=int, default=2)
    p.add_argument("--calib", type=int, default=64, help="calibration images (synthetic train)")
    p.add_argument("--calib-seed", type=int, default=1)
    p.add_argument("--nncf-drops", default="0.01,0.005", help="comma-separated max_drop values")
    p.add_argument(
        "--nncf-pinned-drops",
        default="",
        help="max_drop values for NNCF with OpenVINO's CPU default precision pinned to f32",
    )
    p.add_argument("--inc-drops", default="0.005,0.0003", help="comma-separated max_drop values")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--work", default="runs/accuracy_control", help="data and scratch folder")
    p.add_argument("--doc", default=str(DOC), help="Markdown file to write")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    torch.set_num_threads(max(1, args.threads))
    t_start = time.perf_counter()
    mgr = get_manager()
    work = Path(args.work)
    tmp = work / "passes"
    tmp.mkdir(parents=True, exist_ok=True)

    ckpt = Path(args.checkpoint) if args.checkpoint else packaged_checkpoint()
    if ckpt is None:
        raise DamoError("no trained checkpoint is packaged here", "pass --checkpoint PATH")
    base = load_model(str(ckpt), manager=mgr)
    origin = f"`{ckpt.name}` ({base.arch['builder']} {base.arch.get('kwargs')})"
    size = int(base.inputs[0].concrete()[-1])

    from damo_plugins.data.synthetic import generate

    control = work / f"control-s{args.val_seed}-{args.val_images}"
    held = work / f"heldout-s{args.eval_seed}-{args.eval_images}"
    for root, n, seed in (
        (control, args.val_images, args.val_seed),
        (held, args.eval_images, args.eval_seed),
    ):
        if not (root / "val.json").is_file():
            _log(f"generating {n} val images (seed {seed}) in {root}")
            generate(root, train=0, val=n, seed=seed)

    step = apply_pass(mgr, "reparam", {}, base, tmp)
    _log(f"reparam {verdict(step)}")
    fused = step.raise_if_failed().artifact
    onnx_art = apply_pass(mgr, "export", {"opset": 17}, fused, tmp).raise_if_failed().artifact
    ir = mgr.get_adapter("openvino").convert(onnx_art)
    sources = {"nncf": ir, "inc": fused, "onnxruntime": onnx_art}

    held_cfg = EvaluateConfig(data=str(held))
    held_set = dataset_for(held_cfg, size)
    control_cfg = EvaluateConfig(data=str(control))
    fp32_heldout = evaluate_artifact(ir, held_set, held_cfg, mgr)["mAP"]
    fp32_control = evaluate_artifact(ir, dataset_for(control_cfg, size), control_cfg, mgr)["mAP"]
    _log(f"FP32 mAP: held-out {fp32_heldout:.4f}, control set {fp32_control:.4f}")

    specs = [Spec("nncf", "NNCF → OpenVINO", "nncf")]
    specs += [
        Spec(f"nncf-{d:g}", "NNCF → OpenVINO, accuracy control", "nncf", d)
        for d in _float_list(args.nncf_drops)
    ]
    specs += [
        Spec(
            f"nncf-{d:g}-f32",
            "NNCF → OpenVINO, accuracy control, OV CPU default pinned to f32",
            "nncf",
            d,
            pin_f32=True,
        )
        for d in _float_list(args.nncf_pinned_drops)
    ]
    specs.append(Spec("inc", "INC → OpenVINO", "inc"))
    specs += [
        Spec(f"inc-{d:g}", "INC → OpenVINO, autotune", "inc", d)
        for d in _float_list(args.inc_drops)
    ]
    specs.append(Spec("onnxruntime", "ONNX Runtime QDQ", "onnxruntime"))
    refused = _float_list(args.nncf_drops)[-1:] or [0.005]
    specs.append(Spec("onnxruntime-drop", "ONNX Runtime QDQ", "onnxruntime", refused[0]))

    results: list[Result] = []
    for spec in specs:
        config: dict[str, Any] = {
            "adapter": spec.adapter,
            "calibration": {"synthetic": args.calib, "seed": args.calib_seed},
            "subset_size": args.calib,
            "val": str(control),
            "val_size": args.val_images,
        }
        if spec.max_drop is not None:
            config["max_drop"] = spec.max_drop
        _log(
            f"{spec.key}: {spec.label}" + (f", max_drop {spec.max_drop:g}" if spec.max_drop else "")
        )
        results.append(
            quantize_row(mgr, spec, sources[spec.adapter], config, tmp, (held_set, held_cfg))
        )

    info = machine()
    section = markdown(
        results,
        fp32_heldout,
        fp32_control,
        args,
        argv,
        info,
        origin,
        time.perf_counter() - t_start,
    )
    doc = write_section(args.doc, section)
    print(section)
    _log(f"wrote {doc}")
    summary = {
        "fp32_heldout": fp32_heldout,
        "fp32_control": fp32_control,
        "rows": [
            {
                "key": r.spec.key,
                "max_drop": r.spec.max_drop,
                "ok": r.ok,
                "error": r.error,
                "seconds": r.seconds,
                "heldout_mAP": r.heldout,
                "check": r.check,
                "quantization": r.quant,
                "inc_trials": r.inc_trials,
            }
            for r in results
        ],
    }
    (work / "accuracy_control.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


if __name__ == "__main__":
    main()
