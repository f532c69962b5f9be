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
3. **where work runs** — building nodes and evaluating candidates are independent tasks
   (:mod:`damo_plugins.lib.executors`): in this process by default, in a local process pool
   (``workers``) or as Ray tasks (``ray``). Nodes are built in waves (a node's parent is
   finished before it is submitted). Tasks read their inputs from and write their results
   to the cache, which is therefore the only thing they share with the driver: a node
   finished on the cluster is an entry the driver (or a resumed run) reads, never recomputes.
4. **measuring latency** — only after every build and evaluation task has finished, each
   candidate's latency is timed serially on the target device, interleaved in rounds with
   the baseline (the input model in OpenVINO at f32 and at OpenVINO's default precision), so
   its speed-ups are per-round ratios and no other work of the run competes with it. The
   target device is the driver's, or — with ``device_resource`` on Ray — the node declaring
   that custom resource, one timing task at a time.
5. **choosing** — the fastest candidate (largest speed-up over the baseline measured in the
   same rounds) whose control-split mAP is within ``max_drop`` of the input model's (ties —
   speed-ups within 3 % — go to the smaller model), written to
   ``DIR/best/`` with ``recipe.yaml`` reproducing its chain with ``damo-opt run``.

Cache entries are written to a temporary folder and renamed, so a killed run (or worker)
leaves only whole entries; ``--resume`` reuses them, and a larger space computes only what
is new.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from damo_plugins.core.artifact import ModelArtifact, load_model
from damo_plugins.core.errors import DamoError, first_line
from damo_plugins.core.io import write_text
from damo_plugins.core.manager import PluginManager
from damo_plugins.core.output import OutputFolder
from damo_plugins.lib.executors import Executor, ExecutorError, LocalExecutor, Resources
from damo_plugins.optimize import measure
from damo_plugins.optimize.space import Space

#: latencies closer than this are a tie (then the smaller model wins)
TIE = 0.03
#: bump when what a cache entry holds changes meaning
CACHE_VERSION = 2  # 2: INT8 entries with 7-bit weights on CPUs without VNNI
#: the format each step writes (the quantize step: its target's)
STEP_FORMAT = {"reparam": "torch", "prune": "torch", "export": "onnx", "convert": "openvino"}


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


# ----------------------------------------------------------------------------- the cache
# Module-level so that a worker process (local pool or Ray) reads and writes entries exactly
# as the driver does: the cache folder is the one thing tasks and driver share.
def load_entry(cache: Path, key: str) -> dict[str, Any] | None:
    """A finished cache entry, or None (missing, half-written, or of another version)."""
    try:
        data = json.loads((cache / key / "entry.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("version") == CACHE_VERSION else None


def store_entry(
    cache: Path,
    key: str,
    info: dict[str, Any],
    art: ModelArtifact | None,
    mgr: PluginManager | None = None,
) -> dict[str, Any]:
    """Write an entry atomically: a uniquely named temporary folder renamed when complete.

    The temporary name is unique across hosts (a Ray cluster on shared storage), and an
    entry someone else finished first wins: both computed the same content-addressed thing,
    and replacing a folder another process may be reading would break that reader.
    """
    final = cache / key
    tmp = cache / f".{key}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.mkdir(parents=True)
    try:
        if art is not None:
            saved = art.save(tmp, manager=mgr)
            info["file"] = saved.name
        info["version"] = CACHE_VERSION
        write_text(tmp / "entry.json", json.dumps(info, indent=1, default=str) + "\n")
        existing = load_entry(cache, key)
        if existing is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            return existing
        shutil.rmtree(final, ignore_errors=True)  # a half-written or old-version leftover
        try:
            os.replace(tmp, final)
        except OSError:  # another process renamed its copy in between
            shutil.rmtree(tmp, ignore_errors=True)
            existing = load_entry(cache, key)
            if existing is None:
                raise
            return existing
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


# ------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class TaskSetup:
    """What every task of a run shares (sent once per worker)."""

    cache: str
    seed: int


@dataclass(frozen=True)
class BuildTask:
    """Apply ``step`` to the model at ``parent`` and store the result under ``key``."""

    key: str
    label: str
    step: str
    options: dict[str, Any]
    parent: str
    input_shape: list[int] | None = None


@dataclass(frozen=True)
class EvalTask:
    """mAP of the model at ``model`` on the control and held-out splits of ``data_dir``."""

    key: str
    name: str
    model: str
    precision: str
    device: str
    data_dir: str


@dataclass(frozen=True)
class TimeTask:
    """Latency of the model at ``model`` interleaved with the baseline IR at ``baseline``."""

    name: str
    model: str
    runtime: str
    precision: str
    device: str
    baseline: str
    feed: str
    rounds: int
    slot_seconds: float


def build_task(setup: TaskSetup, task: BuildTask) -> dict[str, Any]:
    """Run one node's step (a worker task). A failed step is a cached, reported result."""
    from damo_plugins.core.manager import get_manager

    cache = Path(setup.cache)
    done = load_entry(cache, task.key)
    if done is not None:  # finished by an earlier attempt, or by another driver
        return {**done, "reused": True}
    mgr = get_manager()
    lines: list[str] = []
    parent = load_model(task.parent, manager=mgr, input_shape=task.input_shape)
    work = cache / f".work-{task.key}-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    try:
        res = measure.apply(
            mgr,
            task.step,
            task.options,
            parent,
            work,
            lambda s: lines.append(s.strip()),
            seed=setup.seed,
        )
    except DamoError as exc:
        info = {"ok": False, "error": first_line(exc), "label": task.label}
        return {**store_entry(cache, task.key, info, None), "log": lines}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    art = res.artifact
    info = {
        "ok": True,
        "label": task.label,
        "step": task.step,
        "options": task.options,
        "format": art.format,
        "params": art.param_count(),
        "flops": art.flops() if art.format == "torch" else None,
        "seconds": round(time.perf_counter() - t0, 2),
        "metrics": _jsonable(res.metrics),
        "verification": res.verification.message if res.verification else None,
    }
    return {**store_entry(cache, task.key, info, art, mgr), "log": lines}


def eval_task(setup: TaskSetup, task: EvalTask) -> dict[str, Any]:
    """mAP of one candidate on both splits (a worker task); cached under ``task.key``."""
    from damo_plugins.core.manager import get_manager

    cache = Path(setup.cache)
    done = load_entry(cache, task.key)
    if done is not None:
        return {**done, "reused": True}
    mgr = get_manager()
    art = load_model(task.model, manager=mgr)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"ok": True, "name": task.name}
    try:
        for split, part in (("val", "control"), ("heldout", "held_out")):
            res[part] = measure.evaluate(
                art, Path(task.data_dir), split, mgr, precision=task.precision, device=task.device
            )
    except DamoError as exc:  # not cached: the next run tries again
        return {"ok": False, "error": first_line(exc), "name": task.name}
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return store_entry(cache, task.key, res, None)


#: compiled baselines of this process, by (IR path, device): a driver (or a reused Ray
#: worker) timing many candidates compiles the baseline once
_BASELINES: dict[tuple[str, str], dict[str, Callable[[], Any]]] = {}


def device_probe(device: str) -> str:
    """Run on the node holding ``device_resource`` before any work: the device is there."""
    from damo_plugins.core.manager import get_manager

    measure.check_device(get_manager(), device)
    import socket

    return socket.gethostname()


def time_task(setup: TaskSetup, task: TimeTask) -> dict[str, Any]:
    """Latency of one candidate in rounds interleaved with the baseline, on this machine.

    Runs on the driver or on the node holding the device (``device_resource``), and only
    when nothing else of the run is computing.
    """
    import numpy as np

    from damo_plugins.core.manager import get_manager
    from damo_plugins.lib.timing import round_ratio

    mgr = get_manager()
    feed = np.load(task.feed)
    base_key = (task.baseline, task.device)
    if base_key not in _BASELINES:
        ir = load_model(task.baseline, manager=mgr)
        _BASELINES[base_key] = {
            "base-f32": measure.runner(ir, "openvino", "f32", task.device, mgr, feed),
            "base-default": measure.runner(ir, "openvino", "default", task.device, mgr, feed),
        }
    art = load_model(task.model, manager=mgr)
    fns = dict(_BASELINES[base_key])
    fns["candidate"] = measure.runner(art, task.runtime, task.precision, task.device, mgr, feed)
    lat = measure.latency(fns, rounds=task.rounds, slot_seconds=task.slot_seconds)
    cand = lat["candidate"]["per_round"]
    return {
        "latency_ms": lat["candidate"]["median_ms"],
        "speedup_original": round_ratio(lat["base-f32"]["per_round"], cand),
        "speedup_default": round_ratio(lat["base-default"]["per_round"], cand),
        "baseline_ms": lat["base-f32"]["median_ms"],
    }


# ------------------------------------------------------------------------------ the DAG
@dataclass
class Node:
    """One model in the DAG: the output of ``step`` applied to ``parent``."""

    key: str
    label: str
    parent: Node | None
    step: str | None
    options: dict[str, Any]
    #: the format the node's model is in (known before it is built)
    format: str = "torch"
    #: the entry (None: not finished yet)
    info: dict[str, Any] | None = None
    #: the model file (finished nodes)
    path: Path | None = None
    failed: str | None = None

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
            if node.format == "torch":
                return node
            node = node.parent
        return self

    @property
    def ok(self) -> bool:
        return self.path is not None


@dataclass
class Candidate:
    name: str
    node: Node
    runtime: str
    precision: str
    key: str
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def eval_key(self) -> str:
        return _hash(self.node.key, self.runtime, self.precision, "mAP")


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
        executor: Executor | None = None,
        device_resource: str | None = None,
    ) -> None:
        self.model_spec, self.data_spec = model, data
        self.out, self.folder = output, folder
        self.device, self.max_drop, self.imgsz = device, max_drop, imgsz
        self.deadline = None if time_budget is None else time.monotonic() + time_budget
        self.no_accuracy, self.space, self.seed = no_accuracy, space, seed
        self.mgr, self.log = mgr, log
        self.executor = executor if executor is not None else LocalExecutor(0)
        self.device_resource = device_resource
        self.cache = output / "cache"
        self.data_dir = output / "data"
        self.nodes: dict[str, Node] = {}
        self.candidates: list[Candidate] = []
        self.skipped: list[str] = []
        self.failed: list[str] = []
        self.stats = {"computed": 0, "cached": 0}
        self.seconds: dict[str, float] = {}
        self.out_of_time: str | None = None
        self.baseline: Node | None = None
        #: quantize node key -> (the FP32 branch it came from, the branch's label)
        self.branch_of: dict[str, tuple[Node, str]] = {}

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
        if self.source.val is not None and not self.no_accuracy:
            # latency only: any images calibrate, whatever classes their labels name
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
        # the toolkit's and backends' versions and the CPU's INT8 kind are inputs too: an
        # upgrade, or a quantizer default that follows the CPU (7-bit weights without VNNI),
        # must not reuse entries made under other conditions
        from damo_plugins import __version__
        from damo_plugins.lib.machine import has_vnni, versions

        self.root_key = _hash(
            fp,
            self.input.input_shape,
            self.parts.fingerprint(),
            self.seed,
            self.labelled,
            __version__,
            versions(),
            has_vnni(),
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
        if key in self.nodes:
            return self.nodes[key]
        if parent is None:
            fmt = self.input.format
        elif step == "quantize":
            fmt = "onnx" if options.get("target") == "onnx" else "openvino"
        else:
            fmt = STEP_FORMAT[step or ""]
        node = Node(key, label, parent, step, options, format=fmt)
        self.nodes[key] = node
        return node

    def _root_ready(self, root: Node) -> None:
        """The input model as the DAG's root: its own file, or (a registered model with
        random weights, which a worker could not rebuild identically) a cache entry."""
        if root.ok:
            return
        info = {
            "ok": True,
            "label": "original",
            "format": self.input.format,
            "params": self.input.param_count(),
            "flops": self.input.flops() if self.input.format == "torch" else None,
        }
        if self.input.path and Path(self.input.path).is_file():
            root.info, root.path = info, Path(self.input.path)
            return
        stored = load_entry(self.cache, root.key) or store_entry(
            self.cache, root.key, info, self.input, self.mgr
        )
        root.info, root.path = stored, self.cache / root.key / stored["file"]

    def _resources(self, step: str | None = None) -> Resources:
        sp = self.space
        serial = isinstance(self.executor, LocalExecutor) and self.executor.in_process
        # in this process, torch may use every CPU (as before executors); a worker gets one
        # unless the space says otherwise, so parallel tasks do not oversubscribe the cores
        cpus = sp.task_cpus if sp.task_cpus is not None else (_cpus() if serial else 1.0)
        mem = sp.task_memory_gb * (2 if step == "prune" else 1) if sp.task_memory_gb else None
        return Resources(cpus=cpus, memory=int(mem * (1 << 30)) if mem else None)

    def build(self, nodes: Iterable[Node]) -> None:
        """Finish ``nodes`` (and their ancestors): cached entries are read, the rest run as
        executor tasks in waves — a node is submitted once its parent is finished."""
        want: dict[str, Node] = {}
        for n in nodes:
            chain: list[Node] = []
            node: Node | None = n
            while node is not None:
                chain.append(node)
                node = node.parent
            for node in chain:
                want.setdefault(node.key, node)
        while True:
            ready: list[Node] = []
            progressed = False
            for node in want.values():
                if node.ok or node.failed:
                    continue
                if node.parent is None:
                    self._root_ready(node)
                    progressed = True
                elif node.parent.failed:
                    node.failed = f"its parent {node.parent.label} failed"
                    progressed = True
                elif node.parent.ok:
                    if self._from_cache(node):
                        progressed = True
                    else:
                        ready.append(node)
            if ready:
                self._run_wave(ready)
            elif all(n.ok or n.failed for n in want.values()):
                return
            elif not progressed:  # pragma: no cover - every pending node has a pending parent
                raise RuntimeError("optimize: the DAG did not progress")

    def _from_cache(self, node: Node) -> bool:
        cached = load_entry(self.cache, node.key)
        if cached is None:
            return False
        self._finish(node, cached, computed=False)
        return True

    def _finish(self, node: Node, info: dict[str, Any], computed: bool) -> None:
        node.info = info
        if info.get("ok") and info.get("file"):
            node.path = self.cache / node.key / info["file"]
            node.format = info.get("format", node.format)
        else:
            node.failed = str(info.get("error"))
            self.failed.append(f"{node.label}: {node.failed}{'' if computed else ' (cached)'}")
            if computed:
                self.log(f"  {node.label}: FAILED: {node.failed}")
        self.stats["computed" if computed else "cached"] += 1

    def _run_wave(self, ready: list[Node]) -> None:
        self._check_budget(ready[0].label)
        setup = TaskSetup(str(self.cache.resolve()), self.seed)
        by_step: dict[str, list[Node]] = {}
        for node in ready:
            self.log(f"  {node.label}: {node.step} ...")
            by_step.setdefault("prune" if node.step == "prune" else "other", []).append(node)
        for kind, group in by_step.items():
            tasks = [
                BuildTask(
                    n.key,
                    n.label,
                    n.step or "",
                    n.options,
                    str(n.parent.path),  # type: ignore[union-attr]
                    # a checkpoint loads at the run's input size (--imgsz), as in the driver
                    list(self.input.input_shape)
                    if n.parent.format == "torch"  # type: ignore[union-attr]
                    else None,
                )
                for n in group
            ]
            for i, info in self.executor.as_completed(
                build_task, tasks, shared=setup, resources=self._resources(kind)
            ):
                node = group[i]
                for line in info.pop("log", [])[-8:]:
                    self.log(f"    {line}")
                reused = bool(info.pop("reused", False))
                if not reused and info.get("seconds") is not None:
                    k = {"prune": "fine-tuning", "quantize": "quantization"}.get(
                        node.step or "", "other"
                    )
                    self.seconds[k] = self.seconds.get(k, 0.0) + float(info["seconds"])
                self._finish(node, info, computed=not reused)
                self._check_budget(f"the nodes after {node.label}")

    def _check_budget(self, what: str) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise _OutOfTime(what)

    def plan(self) -> list[tuple[Node, str]]:
        """FP32 models to deploy: (torch, ONNX or IR node, its label) per branch."""
        sp = self.space
        root = self._node(None, "original", None, {})
        branches: list[tuple[str, Node]] = [("original", root)]
        if self.input.format == "torch":
            if sp.fuse:
                branches.append(("fused", self._node(root, "fused", "reparam", {})))
            for ratio in sp.prune:
                opts: dict[str, Any] = {
                    "ratio": ratio,
                    "scope": sp.prune_scope,
                    "steps": sp.prune_steps,
                }
                if sp.prune_importance != "auto":
                    opts["importance"] = sp.prune_importance
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

    def deployed(self, node: Node, runtime: str) -> Node | None:
        """``node`` exported (ONNX Runtime) or exported and converted (OpenVINO)."""
        want = measure.RUNTIMES[runtime]
        if node.format == want:
            return node
        if node.format == "openvino":
            return None
        if node.format == "torch":
            node = self._node(node, node.label, "export", {"opset": 17})
        if want == "openvino":
            node = self._node(node, node.label, "convert", {"to": "openvino"})
        return node

    # ------------------------------------------------------------ candidates
    def _candidate(self, name: str, node: Node, runtime: str, precision: str) -> Candidate:
        key = _hash(node.key, runtime, precision, self.device, self.space.rounds)
        return Candidate(name, node, runtime, precision, key)

    def int8(
        self,
        branch: Node,
        label: str,
        adapter: str,
        runtimes: list[tuple[str, str]],
        calib: dict[str, Any],
        max_drop: float | None,
    ) -> tuple[Node, list[Candidate]] | None:
        """The INT8 node of a branch through ``adapter`` and its candidates (one per runtime
        its output runs in); None when no runtime of the space runs it."""
        target = "onnx" if adapter == "onnxruntime" else "openvino"
        runtime = "onnxruntime" if target == "onnx" else "openvino"
        use = [(r, p) for r, p in runtimes if r == runtime]
        if not use:
            return None
        # NNCF quantizes the IR, ONNX Runtime the ONNX export, INC the PyTorch model
        src = {
            "nncf": self.deployed(branch, "openvino"),
            "onnxruntime": self.deployed(branch, "onnxruntime"),
        }.get(adapter, branch)
        if src is None:
            return None
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
        node = self._node(src, f"{label} {adapter} {tag}", "quantize", opts)
        self.branch_of[node.key] = (branch, label)
        cands = [
            self._candidate(
                f"{label} INT8 ({adapter}{', acc. control' if max_drop else ''}) · {r} {p}",
                node,
                r,
                p,
            )
            for r, p in use
        ]
        return node, cands

    def evaluate(self, cands: list[Candidate]) -> None:
        """Control and held-out mAP of ``cands`` (cached entries, or executor tasks)."""
        if not self.labelled:
            return
        todo: list[Candidate] = []
        for c in cands:
            # the mAP entry, or a finished candidate's entry (which holds the same figures)
            cached = load_entry(self.cache, c.eval_key)
            if cached is None or "control" not in cached:
                cached = load_entry(self.cache, c.key)
            if cached is not None and "control" in cached:
                c.result.update(control=cached["control"], held_out=cached["held_out"])
                self.stats["cached"] += 1
            else:
                todo.append(c)
        if not todo:
            return
        self._check_budget(f"evaluating {todo[0].name}")
        setup = TaskSetup(str(self.cache.resolve()), self.seed)
        tasks = [
            EvalTask(
                c.eval_key,
                c.name,
                str(c.node.path),
                c.precision if c.runtime == "openvino" else "f32",
                self.device,
                str(self.data_dir.resolve()),
            )
            for c in todo
        ]
        t0 = time.perf_counter()
        self.log(f"evaluating {len(todo)} candidate(s) on {self.executor.describe()} ...")
        try:
            for i, res in self.executor.as_completed(
                eval_task, tasks, shared=setup, resources=self._resources()
            ):
                c = todo[i]
                if not res.get("ok"):
                    c.result = {"ok": False, "error": res.get("error")}
                    self.failed.append(f"{c.name}: {res.get('error')}")
                    continue
                reused = bool(res.pop("reused", False))
                c.result.update(control=res["control"], held_out=res["held_out"])
                self.stats["cached" if reused else "computed"] += 1
                self.log(
                    f"  mAP {c.name}: control {res['control']['mAP']:.4f}, "
                    f"held-out {res['held_out']['mAP']:.4f}"
                )
                self._check_budget(f"the evaluations after {c.name}")
        finally:
            self.seconds["evaluation"] = (
                self.seconds.get("evaluation", 0.0) + time.perf_counter() - t0
            )

    def time_all(self, cands: list[Candidate]) -> None:
        """Latency of every candidate, one after the other, on the target device."""
        import numpy as np

        setup = TaskSetup(str(self.cache.resolve()), self.seed)
        baseline = self.baseline
        assert baseline is not None
        feed = self.cache / "feed.npy"
        if not feed.is_file():
            from damo_plugins.data.calibration import read_images

            calib = str((self.data_dir / "calib").resolve())
            x = np.asarray(read_images(calib, input_shape=self.input.input_shape)[0], np.float32)
            tmp = self.cache / f".feed.{uuid.uuid4().hex[:8]}.npy"
            np.save(tmp, x)
            os.replace(tmp, feed)
        remote = None
        if self.device_resource and self.executor.kind == "ray":
            remote = Resources(cpus=1, custom={self.device_resource: 1})
        total = len(cands)
        for done, c in enumerate(cands, 1):
            if c.result.get("ok") is False:
                continue
            cached = load_entry(self.cache, c.key)
            if cached is not None and "latency_ms" in cached:
                c.result = cached
                self.stats["cached"] += 1
                self._progress(c, done, total, cached=True)
                continue
            task = TimeTask(
                c.name,
                str(c.node.path),
                c.runtime,
                c.precision,
                self.device,
                str(baseline.path),
                str(feed.resolve()),
                self.space.rounds,
                self.space.slot_seconds,
            )
            t0 = time.perf_counter()
            try:
                if remote is not None:  # on the node that has the device, alone
                    (lat,) = self.executor.map(time_task, [task], shared=setup, resources=remote)
                else:
                    lat = time_task(setup, task)
            except ExecutorError:
                raise  # the cluster, not the candidate: the run stops (and can resume)
            except DamoError as exc:
                c.result = {"ok": False, "error": first_line(exc)}
                self.failed.append(f"{c.name}: {first_line(exc)}")
                continue
            finally:
                self.seconds["timing"] = self.seconds.get("timing", 0.0) + (
                    time.perf_counter() - t0
                )
            res = {"ok": True, "name": c.name, **c.result, **lat}
            c.result = store_entry(self.cache, c.key, res, None)
            self.stats["computed"] += 1
            self._progress(c, done, total, cached=False)

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
        measured = [
            c for c in self.candidates if c.result.get("ok") and "speedup_original" in c.result
        ]
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
        assert cand.node.path is not None
        return cand.node.path

    # ------------------------------------------------------------------- run
    def run(self) -> None:
        """Build, evaluate (in parallel where the executor allows), then time serially."""
        runtimes = self.runtimes()
        quantizers = self.quantizers()
        if not runtimes:
            raise DamoError(
                "the candidate space is empty: no runtime of the space runs on " + self.device,
                "add openvino-f32 or onnxruntime to runtimes",
            )
        if self.device_resource and self.executor.kind == "ray":
            # first: a label no node declares (or a node without the device) costs nothing
            (host,) = self.executor.map(
                device_probe,
                [self.device],
                resources=Resources(cpus=1, custom={self.device_resource: 1}),
            )
            self.log(f"latency will be timed on {host} (Ray resource {self.device_resource})")
        self.cache.mkdir(exist_ok=True)
        self.folder.record("cache")
        for leftover in self.cache.glob(".*"):  # what killed runs or workers left half-done
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        calib_opts = {"images": str((self.data_dir / "calib").resolve())}
        branches = self.plan()
        # the baseline: the input model as OpenVINO IR, at f32 and at OpenVINO's default
        root_ir = self.deployed(branches[0][0], "openvino")
        if root_ir is None:
            raise DamoError("the input model could not be converted to OpenVINO IR")
        queue: list[Candidate] = []
        for node, label in branches:
            for runtime, precision in runtimes:
                dep = self.deployed(node, runtime)
                if dep is not None:
                    queue.append(
                        self._candidate(f"{label} · {runtime} {precision}", dep, runtime, precision)
                    )
            if node.parent is None and len(branches) > 1:
                # the input model is the reference; INT8 goes on its fused/pruned forms
                # (quantizers fold BN themselves: INT8 of the unfused model adds nothing)
                continue
            for q in quantizers:
                made = self.int8(node, label, q, runtimes, calib_opts, max_drop=None)
                if made is not None:
                    queue.extend(made[1])
        self.log(
            f"optimize: {len(queue)} candidates on {self.device}; building and evaluating on "
            f"{self.executor.describe()}"
        )
        try:
            self.build([root_ir, *(c.node for c in queue)])
            if not root_ir.ok:
                raise DamoError(
                    f"the input model could not be converted to OpenVINO IR ({root_ir.failed})"
                )
            self.baseline = root_ir
            queue = [c for c in queue if c.node.ok]
            self.evaluate(queue)
            queue.extend(self._accuracy_control(queue, branches, calib_opts))
        except _OutOfTime as exc:
            if self.baseline is None:
                raise
            self.out_of_time = exc.message
            self.log(f"optimize: {exc.message}; timing what was built and evaluated")
            queue = [c for c in queue if c.node.ok and (not self.labelled or "control" in c.result)]
        self.candidates = queue
        self.log(f"timing {len(queue)} candidate(s) on {self.device}, one at a time ...")
        self.time_all(queue)

    def _accuracy_control(
        self, queue: list[Candidate], branches: list[tuple[Node, str]], calib: dict[str, Any]
    ) -> list[Candidate]:
        """INT8 again with accuracy control where plain INT8 misses the budget (control)."""
        if not (self.labelled and self.space.accuracy_control):
            return []
        self.candidates = queue
        ref = self.reference_map()
        if ref is None:
            return []
        extra: list[Candidate] = []
        keys = {c.key for c in queue}
        for c in queue:
            if (
                c.node.step != "quantize"
                or "max_drop" in c.node.options
                or "control" not in c.result
                or ref - c.result["control"]["mAP"] <= self.max_drop
                or c.node.options["adapter"] == "onnxruntime"  # no accuracy control there
            ):
                continue
            branch, label = self.branch_of[c.node.key]
            self.log(f"  {c.name}: misses the budget on the control split; trying accuracy control")
            made = self.int8(
                branch,
                label,
                c.node.options["adapter"],
                [(c.runtime, c.precision)],
                calib,
                max_drop=self.max_drop,
            )
            for cand in made[1] if made else []:
                if cand.key not in keys:
                    keys.add(cand.key)
                    extra.append(cand)
        if extra:
            self.build([c.node for c in extra])
            for c in extra:
                if c.node.failed:
                    self.failed.append(f"{c.name}: accuracy control: {c.node.failed}")
            extra = [c for c in extra if c.node.ok]
            self.evaluate(extra)
        return extra


def _cpus() -> float:
    """The CPUs this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return float(max(1, len(os.sched_getaffinity(0))))
    return float(os.cpu_count() or 1)


class _OutOfTime(DamoError):
    def __init__(self, what: str) -> None:
        super().__init__(f"time budget spent before {what}")


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
