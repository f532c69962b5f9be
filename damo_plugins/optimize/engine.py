"""``optimize``: the fastest model for a device within an accuracy budget, measured.

How a run goes:

1. **data** — :mod:`damo_plugins.data.sources` resolves ``--data`` and cuts it into three
   disjoint parts written under ``DIR/data`` (calibration from train, *control* and
   *held-out* from val). Every decision (accuracy control, choosing the best) sees the
   control split only; the reported mAP is the held-out split's.
2. **the DAG** — candidates are chains of existing passes sharing prefixes: the input model
   (and its ONNX export and OpenVINO IR, the baseline) -> ``reparam`` -> ``prune`` at each
   fraction (+ fine-tuning, + ``reparam``) -> ``export`` -> ``convert`` -> ``quantize`` per
   adapter (again with ``max_drop`` accuracy control when plain INT8 misses the budget on the
   control split). Each node is one pass through the step runner; its output is cached under
   ``DIR/cache/<hash>`` where the hash covers the input model's bytes, the data parts and
   every step's options up to the node. A candidate is a node deployed on a runtime at a
   precision (OpenVINO f32, OpenVINO bf16 — named, only where the device has it — or ONNX
   Runtime); its mAP and latency are cached the same way.
3. **measuring** — each candidate's latency is timed serially on the target device,
   interleaved in rounds with the baseline (the input model in OpenVINO at f32 and at
   OpenVINO's default precision), so its speed-ups are per-round ratios.
4. **choosing** — the fastest candidate (largest speed-up over the baseline measured in the
   same rounds) whose control-split mAP is within ``max_drop`` of the input model's (ties —
   speed-ups within 3 % — go to the smaller model), written to
   ``DIR/best/`` with ``recipe.yaml`` reproducing its chain with ``damo-opt run``.

Cache entries are written to a temporary folder and renamed, so a killed run leaves only
whole entries; ``--resume`` reuses them, and a larger space computes only what is new.
Candidates run one after the other in this process: the seam for an executor
(:mod:`damo_plugins.lib.executors`) is :meth:`Optimizer._compute`, but timing must stay
serial and the 2-core machines this runs on gain nothing from overlapping the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from damo_plugins.core.artifact import ModelArtifact, load_model
from damo_plugins.core.errors import DamoError, first_line
from damo_plugins.core.io import write_text
from damo_plugins.core.manager import PluginManager
from damo_plugins.core.output import OutputFolder
from damo_plugins.optimize import measure
from damo_plugins.optimize.space import Space

#: latencies closer than this are a tie (then the smaller model wins)
TIE = 0.03
#: bump when what a cache entry holds changes meaning
CACHE_VERSION = 1


def parse_duration(text: str | float | None) -> float | None:
    """``30m``, ``90s``, ``1.5h`` or seconds -> seconds."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    t = str(text).strip().lower()
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if t and t[-1] in units:
            value = float(t[:-1]) * units[t[-1]]
        else:
            value = float(t)
    except ValueError:
        raise DamoError(f"--time-budget '{text}' is not a duration", "e.g. 30m, 90s, 2h") from None
    if value <= 0:
        raise DamoError(f"--time-budget '{text}' must be positive")
    return value


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in measure.model_files(path):
        if f.is_file():
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


@dataclass
class Node:
    """One model in the DAG: the output of ``step`` applied to ``parent``."""

    key: str
    label: str
    parent: Node | None
    step: str | None
    options: dict[str, Any]
    artifact: ModelArtifact | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def chain(self) -> list[tuple[str, dict[str, Any]]]:
        """The steps from the input model to this node."""
        steps: list[tuple[str, dict[str, Any]]] = []
        node: Node | None = self
        while node is not None and node.step is not None:
            steps.append((node.step, node.options))
            node = node.parent
        return steps[::-1]

    def torch_source(self) -> Node:
        """The nearest PyTorch model up the chain (what params and FLOPs are counted on)."""
        node: Node | None = self
        while node is not None:
            if node.info.get("format") == "torch":
                return node
            node = node.parent
        return self


@dataclass
class Candidate:
    name: str
    node: Node
    runtime: str
    precision: str
    key: str
    result: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizeResult:
    """What :func:`optimize` returns: the table rows, the chosen one and where things are."""

    output: Path
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    report: dict[str, Any]


class Optimizer:
    def __init__(
        self,
        model: str,
        data: str,
        *,
        output: Path,
        folder: OutputFolder,
        device: str,
        max_drop: float,
        imgsz: int | None,
        time_budget: float | None,
        no_accuracy: bool,
        space: Space,
        seed: int,
        mgr: PluginManager,
        log: Callable[[str], None],
    ) -> None:
        self.model_spec, self.data_spec = model, data
        self.out, self.folder = output, folder
        self.device, self.max_drop, self.imgsz = device, max_drop, imgsz
        self.deadline = None if time_budget is None else time.monotonic() + time_budget
        self.no_accuracy, self.space, self.seed = no_accuracy, space, seed
        self.mgr, self.log = mgr, log
        self.cache = output / "cache"
        self.data_dir = output / "data"
        self.nodes: dict[str, Node] = {}
        self.candidates: list[Candidate] = []
        self.skipped: list[str] = []
        self.failed: list[str] = []
        self.stats = {"computed": 0, "cached": 0}
        self.seconds: dict[str, float] = {}
        self.baseline: dict[str, Any] = {}
        #: quantize node key -> (the FP32 branch it came from, the branch's label)
        self.branch_of: dict[str, tuple[Node, str]] = {}

    # ------------------------------------------------------------------- cache
    def _entry(self, key: str) -> Path:
        return self.cache / key

    def _load_cached(self, key: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self._entry(key) / "entry.json").read_text())
        except (OSError, ValueError):
            return None
        return data if data.get("version") == CACHE_VERSION else None

    def _store(self, key: str, info: dict[str, Any], art: ModelArtifact | None) -> dict[str, Any]:
        """Write an entry atomically: a temporary folder renamed when complete."""
        final = self._entry(key)
        tmp = self.cache / f".{key}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            if art is not None:
                saved = art.save(tmp, manager=self.mgr)
                info["file"] = saved.name
            info["version"] = CACHE_VERSION
            write_text(tmp / "entry.json", json.dumps(info, indent=1, default=str) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return info

    # -------------------------------------------------------------------- data
    def prepare(self) -> None:
        from damo_plugins.data.sources import materialize, model_classes, resolve, split_parts

        t0 = time.perf_counter()
        measure.check_device(self.mgr, self.device)  # first: a wrong device costs nothing
        self.source = resolve(self.data_spec, seed=self.seed)
        if not self.source.labelled and not self.no_accuracy:
            raise DamoError(
                f"{self.data_spec} has no labels: an accuracy budget cannot be checked",
                "give labelled data (COCO annotations), or --no-accuracy for a latency-only search",
            )
        shape = [1, 3, self.imgsz, self.imgsz] if self.imgsz else None
        self.input = load_model(self.model_spec, manager=self.mgr, input_shape=shape)
        if self.input.format != "torch" and (self.space.fuse or self.space.prune):
            self.log(f"note: the model is {self.input.format}: fuse and prune do not apply")
        if not self.input.inputs or len(self.input.input_shape) != 4:
            raise DamoError(
                "optimize needs an image model with input [1, 3, S, S]", "give --imgsz N"
            )
        if self.source.val is not None:
            self.source.check_classes(model_classes(self.input))
        sp = self.space
        self.parts = split_parts(
            self.source,
            calibration=sp.calibration,
            control=sp.control,
            held_out=sp.held_out,
            seed=self.seed,
        )
        self.labelled = self.source.labelled and not self.no_accuracy
        materialize(self.parts, self.data_dir)
        self.folder.record("data")
        model_path = Path(self.input.path) if self.input.path else None
        fp = _file_hash(model_path) if model_path else _hash(self.model_spec)
        self.root_key = _hash(
            fp, self.input.input_shape, self.parts.fingerprint(), self.seed, self.labelled
        )
        self.seconds["data"] = time.perf_counter() - t0
        self.log(
            f"data: {self.source.describe()}; calibration {len(self.parts.calibration)} images "
            f"({self.parts.calibration_from}), control {len(self.parts.control)}, held-out "
            f"{len(self.parts.held_out)} (val, disjoint)"
        )

    # ---------------------------------------------------------------- the DAG
    def _node(
        self, parent: Node | None, label: str, step: str | None, options: dict[str, Any]
    ) -> Node:
        key = self.root_key if parent is None else _hash(parent.key, step, options)
        node = self.nodes.get(key) or Node(key, label, parent, step, options)
        self.nodes[key] = node
        return node

    def _compute(self, node: Node) -> Node | None:
        """The node's artifact (from the cache, or by running its step); None if it failed."""
        if node.artifact is not None:
            return node
        if node.parent is None:
            node.artifact = self.input
            node.info = {
                "format": self.input.format,
                "params": self.input.param_count(),
                "flops": self.input.flops(),
            }
            return node
        if node.parent.artifact is None and self._compute(node.parent) is None:
            return None
        cached = self._load_cached(node.key)
        if cached is not None and cached.get("ok") and cached.get("file"):
            node.info = cached
            node.artifact = load_model(self._entry(node.key) / cached["file"], manager=self.mgr)
            if node.artifact.format == "torch" and not node.artifact.inputs:
                node.artifact.inputs = node.parent.artifact.inputs  # pragma: no cover
            self.stats["cached"] += 1
            return node
        if cached is not None and not cached.get("ok"):
            self.failed.append(f"{node.label}: {cached.get('error')} (cached)")
            return None
        self._check_budget(node.label)
        t0 = time.perf_counter()
        self.log(f"  {node.label}: {node.step} ...")
        work = self.cache / f".work-{node.key}"
        try:
            res = measure.apply(
                self.mgr,
                node.step or "",
                node.options,
                node.parent.artifact,
                work,
                lambda s: self.log(f"    {s.strip()}"),
                seed=self.seed,
            )
        except DamoError as exc:
            self._store(
                node.key, {"ok": False, "error": first_line(exc), "label": node.label}, None
            )
            self.failed.append(f"{node.label}: {first_line(exc)}")
            self.log(f"  {node.label}: FAILED: {first_line(exc)}")
            return None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        seconds = time.perf_counter() - t0
        kind = {"prune": "fine-tuning", "quantize": "quantization"}.get(node.step or "", "other")
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds
        art = res.artifact
        flops = art.flops() if art.format == "torch" else None
        info = {
            "ok": True,
            "label": node.label,
            "step": node.step,
            "options": node.options,
            "format": art.format,
            "params": art.param_count(),
            "flops": flops,
            "seconds": round(seconds, 2),
            "metrics": _jsonable(res.metrics),
            "verification": res.verification.message if res.verification else None,
        }
        node.info = self._store(node.key, info, art)
        node.artifact = load_model(self._entry(node.key) / node.info["file"], manager=self.mgr)
        self.stats["computed"] += 1
        return node

    def _check_budget(self, what: str) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise _OutOfTime(what)

    def plan(self) -> list[tuple[Node, str]]:
        """FP32 models to deploy: (IR or ONNX node, its label) per torch branch."""
        sp = self.space
        root = self._node(None, "original", None, {})
        branches: list[tuple[str, Node]] = [("original", root)]
        if self.input.format == "torch":
            if sp.fuse:
                branches.append(("fused", self._node(root, "fused", "reparam", {})))
            for ratio in sp.prune:
                opts: dict[str, Any] = {"ratio": ratio, "scope": "global", "steps": 1}
                if self.source.train is not None and sp.finetune_epochs:
                    opts.update(
                        finetune_epochs=sp.finetune_epochs,
                        data=str(self.data_dir.resolve()),
                        img_size=int(self.input.input_shape[-1]),
                        eval_limit=len(self.parts.control),
                        batch_size=16,
                    )
                pruned = self._node(root, f"pruned {ratio:.0%}", "prune", opts)
                label = f"pruned {ratio:.0%}" + (" + fine-tuned" if "data" in opts else "")
                branches.append((label, self._node(pruned, label + " fused", "reparam", {})))
        return [(node, label) for label, node in branches]

    def quantizers(self) -> list[str]:
        installed = set(self.mgr.names("adapter"))
        wanted = self.space.quantizers
        if wanted is None:
            return [q for q in ("nncf", "onnxruntime") if q in installed]
        missing = [q for q in wanted if q not in installed]
        if missing:
            self.skipped.append(f"quantizer(s) {', '.join(missing)}: adapter not installed")
        return [q for q in wanted if q in installed]

    def runtimes(self) -> list[tuple[str, str]]:
        out = []
        for r in self.space.runtimes:
            runtime, _, precision = r.partition("-")
            precision = precision or "f32"
            if runtime == "openvino" and not measure.precision_supported(self.device, precision):
                self.skipped.append(
                    f"openvino-{precision}: {self.device} has no native {precision} support here"
                )
                continue
            out.append((runtime, precision))
        return out

    # ------------------------------------------------------------ candidates
    def _candidate(self, name: str, node: Node, runtime: str, precision: str) -> Candidate:
        key = _hash(node.key, runtime, precision, self.device, self.space.rounds)
        return Candidate(name, node, runtime, precision, key)

    def _measure(self, cand: Candidate, done: int, total: int) -> None:
        """mAP (control, held-out) and latency vs the baseline, cached per candidate."""
        cached = self._load_cached(cand.key)
        if cached is not None:
            cand.result = cached
            self.stats["cached"] += 1
            self._progress(cand, done, total, cached=True)
            return
        self._check_budget(cand.name)
        art = cand.node.artifact
        assert art is not None
        res: dict[str, Any] = {"ok": True, "name": cand.name}
        t0 = time.perf_counter()
        if self.labelled:
            for split, part in (("val", "control"), ("heldout", "held_out")):
                res[part] = measure.evaluate(
                    art,
                    self.data_dir,
                    split,
                    self.mgr,
                    precision=cand.precision,
                    device=self.device,
                )
        self.seconds["evaluation"] = self.seconds.get("evaluation", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        if "fns" not in self.baseline:  # compiled only when something is timed (not on resume)
            ir = self.baseline["ir"]
            self.baseline["fns"] = {
                "base-f32": measure.runner(ir, "openvino", "f32", self.device, self.mgr, self.feed),
                "base-default": measure.runner(
                    ir, "openvino", "default", self.device, self.mgr, self.feed
                ),
            }
        fns = dict(self.baseline["fns"])
        fns["candidate"] = measure.runner(
            art, cand.runtime, cand.precision, self.device, self.mgr, self.feed
        )
        lat = measure.latency(fns, rounds=self.space.rounds, slot_seconds=self.space.slot_seconds)
        from damo_plugins.lib.timing import round_ratio

        res["latency_ms"] = lat["candidate"]["median_ms"]
        res["speedup_original"] = round_ratio(
            lat["base-f32"]["per_round"], lat["candidate"]["per_round"]
        )
        res["speedup_default"] = round_ratio(
            lat["base-default"]["per_round"], lat["candidate"]["per_round"]
        )
        res["baseline_ms"] = lat["base-f32"]["median_ms"]
        self.seconds["timing"] = self.seconds.get("timing", 0.0) + time.perf_counter() - t0
        cand.result = self._store(cand.key, res, None)
        self.stats["computed"] += 1
        self._progress(cand, done, total, cached=False)

    def _progress(self, cand: Candidate, done: int, total: int, cached: bool) -> None:
        r = cand.result
        m = f", control mAP {r['control']['mAP']:.4f}" if "control" in r else ""
        best = self.choose()
        self.log(
            f"[{done}/{total}] {cand.name}: {r['latency_ms']:.2f} ms "
            f"({r['speedup_original']:.2f}x){m}{' (cached)' if cached else ''}; "
            f"best so far: {best.name if best else '-'}"
        )

    def choose(self) -> Candidate | None:
        """Fastest within ``max_drop`` on the control split; near-ties to the smaller model."""
        measured = [c for c in self.candidates if c.result.get("ok")]
        if not measured:
            return None
        if self.labelled:
            ref = self.reference_map()
            measured = [
                c
                for c in measured
                if ref is None or ref - c.result["control"]["mAP"] <= self.max_drop + 1e-9
            ]
            if not measured:
                return None
        # ranked by the speed-up over the baseline measured in the same rounds, not by raw
        # milliseconds: candidates are timed minutes apart and the load of a shared machine
        # moves raw times by more than the differences being decided
        fastest = max(c.result["speedup_original"] for c in measured)
        near = [c for c in measured if c.result["speedup_original"] >= fastest / (1 + TIE)]
        return min(
            near,
            key=lambda c: (
                measure.size_on_disk(self.model_path(c)) or 0,
                -c.result["speedup_original"],
            ),
        )

    def reference_map(self) -> float | None:
        base = next((c for c in self.candidates if c.name == "original · openvino f32"), None)
        if base is None or "control" not in base.result:
            return None
        return float(base.result["control"]["mAP"])

    def model_path(self, cand: Candidate) -> Path:
        return (
            self._entry(cand.node.key) / cand.node.info["file"]
            if cand.node.parent
            else Path(
                cand.node.artifact.path  # type: ignore[union-attr]
            )
        )

    # ------------------------------------------------------------------- run
    def run(self) -> None:
        import numpy as np

        from damo_plugins.data.calibration import read_images

        runtimes = self.runtimes()
        quantizers = self.quantizers()
        if not runtimes:
            raise DamoError(
                "the candidate space is empty: no runtime of the space runs on " + self.device,
                "add openvino-f32 or onnxruntime to runtimes",
            )
        self.cache.mkdir(exist_ok=True)
        self.folder.record("cache")
        for leftover in self.cache.glob(".*"):
            shutil.rmtree(leftover, ignore_errors=True)
        calib_dir = str((self.data_dir / "calib").resolve())
        calib_opts = {"images": calib_dir}
        self.feed = np.asarray(
            read_images(calib_dir, input_shape=self.input.input_shape)[0], dtype=np.float32
        )
        # the baseline: the input model as OpenVINO IR, at f32 and at OpenVINO's default
        branches = self.plan()
        total_guess = len(branches) * (len(runtimes) + len(quantizers))
        self.log(f"optimize: ~{total_guess} candidates on {self.device}")
        root_ir = self._deployed(branches[0][0], "openvino")
        if root_ir is None or root_ir.artifact is None:
            raise DamoError("the input model could not be converted to OpenVINO IR (see above)")
        self.baseline["ir"] = root_ir.artifact
        queue: list[Candidate] = []
        for node, label in branches:
            for runtime, precision in runtimes:
                dep = self._deployed(node, runtime)
                if dep is not None:
                    queue.append(
                        self._candidate(f"{label} · {runtime} {precision}", dep, runtime, precision)
                    )
            if node.parent is None and len(branches) > 1:
                # the input model is the reference; INT8 goes on its fused/pruned forms
                # (quantizers fold BN themselves: INT8 of the unfused model adds nothing)
                continue
            for q in quantizers:
                for c in self._int8(node, label, q, runtimes, calib_opts, max_drop=None):
                    queue.append(c)
        done = 0
        i = 0
        while i < len(queue):
            cand = queue[i]
            i += 1
            self.candidates.append(cand)
            done += 1
            try:
                self._measure(cand, done, len(queue))
            except DamoError as exc:
                if isinstance(exc, _OutOfTime):
                    raise
                cand.result = {"ok": False, "error": first_line(exc)}
                self.failed.append(f"{cand.name}: {first_line(exc)}")
                continue
            # accuracy control when plain INT8 misses the budget on the control split
            if (
                self.labelled
                and self.space.accuracy_control
                and cand.node.step == "quantize"
                and "max_drop" not in cand.node.options
                and (ref := self.reference_map()) is not None
                and ref - cand.result["control"]["mAP"] > self.max_drop
            ):
                branch, base_label = self.branch_of[cand.node.key]
                for extra in self._int8_retry(branch, base_label, cand, calib_opts):
                    if all(c.key != extra.key for c in queue):
                        queue.append(extra)

    def _deployed(self, node: Node, runtime: str) -> Node | None:
        """``node`` exported (ONNX Runtime) or exported and converted (OpenVINO)."""
        node = self._compute(node) or node
        if node.artifact is None:
            return None
        fmt = node.artifact.format
        want = measure.RUNTIMES[runtime]
        if fmt == want:
            return node
        if fmt == "openvino":
            return None
        label = node.label
        if fmt == "torch":
            node = self._node(node, label, "export", {"opset": 17})
            if self._compute(node) is None:
                return None
        if want == "openvino":
            node = self._node(node, label, "convert", {"to": "openvino"})
            if self._compute(node) is None:
                return None
        return node

    def _int8(
        self,
        branch: Node,
        label: str,
        adapter: str,
        runtimes: list[tuple[str, str]],
        calib: dict[str, Any],
        max_drop: float | None,
    ) -> list[Candidate]:
        """INT8 of a branch through ``adapter``, on each runtime its output runs in."""
        target = "onnx" if adapter == "onnxruntime" else "openvino"
        runtime = "onnxruntime" if target == "onnx" else "openvino"
        use = [(r, p) for r, p in runtimes if r == runtime]
        if not use:
            return []
        # NNCF quantizes the IR, ONNX Runtime the ONNX export, INC the PyTorch model
        src = {
            "nncf": self._deployed(branch, "openvino"),
            "onnxruntime": self._deployed(branch, "onnxruntime"),
        }.get(adapter, branch)
        if src is None:
            return []
        opts: dict[str, Any] = {
            "adapter": adapter,
            "target": target,
            "calibration": calib,
            "subset_size": len(self.parts.calibration),
        }
        tag = "INT8"
        if max_drop is not None:
            opts.update(
                max_drop=max_drop,
                val={
                    "coco": str((self.data_dir / "val.json").resolve()),
                    "images": str((self.data_dir / "val").resolve()),
                },
                val_size=len(self.parts.control),
            )
            tag = "INT8 accuracy-controlled"
        name = f"{label} INT8"
        node = self._node(src, f"{label} {adapter} {tag}", "quantize", opts)
        self.branch_of[node.key] = (branch, label)
        if self._compute(node) is None:
            return []
        return [
            self._candidate(
                f"{name} ({adapter}{', acc. control' if max_drop else ''}) · {r} {p}", node, r, p
            )
            for r, p in use
        ]

    def _int8_retry(
        self, branch: Node, label: str, cand: Candidate, calib: dict[str, Any]
    ) -> list[Candidate]:
        adapter = cand.node.options["adapter"]
        if adapter == "onnxruntime":  # no accuracy control in the ONNX Runtime adapter
            return []
        self.log(f"  {cand.name}: misses the budget on the control split; trying accuracy control")
        runtimes = [(cand.runtime, cand.precision)]
        try:
            return self._int8(branch, label, adapter, runtimes, calib, max_drop=self.max_drop)
        except DamoError as exc:
            self.failed.append(f"{label} {adapter} accuracy control: {first_line(exc)}")
            return []


class _OutOfTime(DamoError):
    def __init__(self, what: str) -> None:
        super().__init__(f"time budget spent before {what}")


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
