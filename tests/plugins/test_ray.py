"""Scale-out on a real local Ray cluster: the executor on Ray, NAS on Ray equal to a local
search, a worker killed mid-task, sharded mAP equal to single-process mAP, the address form
on a head node started here, a lost cluster and resuming after the driver died.

One Ray instance (``ray.init(num_cpus=2)``) serves this module; the ``--ray`` executors in
this process reuse it. The address-form tests start a head node on 127.0.0.1 with
``ray start --head`` in its own temporary folder and stop exactly its processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
import ray  # a dev requirement (requirements-dev.txt): missing, these tests fail

from damo_plugins.core.errors import DamoError
from damo_plugins.lib.executors import ExecutorError, RayExecutor, Resources
from damo_plugins.nas.analysis import analyzer_for
from damo_plugins.nas.search import Budgets, Search, SearchConfig
from damo_plugins.nas.space import SearchSpace
from damo_plugins.nas.structures import resolve_structure
from tests.conftest import assert_clean_error, damo_opt
from tests.core.test_executors import fail_on_three, scaled

AUTH_VARS = ("RAY_AUTH_MODE",)


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[Any]:
    saved = {k: os.environ.get(k) for k in AUTH_VARS}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        yield ray
    finally:
        ray.shutdown()
        for k, v in saved.items():  # ray.init turns token auth on for this process
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def executor(ray_instance: Any) -> Iterator[RayExecutor]:
    ex = RayExecutor("local", retries=3)  # reuses the module's instance, leaves it running
    yield ex
    ex.close()
    assert ray_instance.is_initialized()


# --------------------------------------------------------------------------- executor
def test_ray_executor_order_shared_errors_and_resources(executor: RayExecutor) -> None:
    assert executor.workers == 2
    assert executor.map(scaled, range(20), shared={"k": 3}) == [3 * i for i in range(20)]
    with pytest.raises(DamoError, match="three is not allowed"):  # the task's own exception
        executor.map(fail_on_three, range(5))
    t0 = time.monotonic()
    with pytest.raises(ExecutorError, match="no node of the Ray cluster has"):
        executor.map(scaled, [1], shared={"k": 1}, resources=Resources(custom={"npu": 1}))
    with pytest.raises(ExecutorError, match="no node"):
        executor.map(scaled, [1], shared={"k": 1}, resources=Resources(cpus=64))
    assert time.monotonic() - t0 < 5  # refused up front, not left pending forever


# --------------------------------------------------------------------------- NAS on Ray
def _tiny_search(**kw: Any) -> Search:
    an, g = analyzer_for(resolve_structure("t"), 640, True)
    budgets = Budgets(layers=20, flops=an.metrics(g).flops, params=2_500_000)
    config = SearchConfig(
        population=8,
        iterations=kw.pop("iterations", 12),
        seed=3,
        score="entropy",
        entropy_resolution=kw.pop("entropy_resolution", 64),
        entropy_batch=2,
        entropy_repeats=2,
        batch=4,
        workers=0,
        **kw,
    )
    return Search(resolve_structure("init"), SearchSpace("k1kx", kernels=(3, 5)), budgets, config)


def _same(a: Any, b: Any) -> None:
    assert a.best.genome == b.best.genome
    assert a.best.score == b.best.score  # exactly: per-candidate seeds, not per-worker
    assert [(m.genome, m.score) for m in a.population] == [
        (m.genome, m.score) for m in b.population
    ]
    assert (a.iterations, a.evaluated, a.duplicates) == (b.iterations, b.evaluated, b.duplicates)


@pytest.fixture(scope="module")
def local_search() -> Any:
    return _tiny_search().run()


def test_nas_entropy_search_on_ray_equals_local(executor: RayExecutor, local_search: Any) -> None:
    on_ray = _tiny_search().run(executor=executor)
    assert on_ray.evaluated >= 4
    _same(on_ray, local_search)
    assert on_ray.best.score > on_ray.init.score


def _kill_first_task_worker(killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the first of *our* Ray workers seen running a task (``ray::_ray_task``)."""
    while not stop.is_set() and not killed:
        for p in psutil.Process().children(recursive=True):
            try:
                title = p.cmdline()
            except (psutil.Error, OSError):
                continue
            if title and title[0].startswith("ray::_ray_task"):
                os.kill(p.pid, signal.SIGKILL)
                killed.append(p.pid)
                return
        time.sleep(0.01)


@contextlib.contextmanager
def killing_a_task_worker(killed: list[int]) -> Iterator[None]:
    """While the block runs, SIGKILL the first Ray worker seen running a task."""
    stop = threading.Event()
    t = threading.Thread(target=_kill_first_task_worker, args=(killed, stop))
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def test_worker_killed_during_nas_evaluation(executor: RayExecutor) -> None:
    """A worker SIGKILLed while it scores a candidate: Ray retries the task; the search
    ends exactly as an undisturbed local one."""
    local = _tiny_search(iterations=8, entropy_resolution=160).run()
    killed: list[int] = []
    with killing_a_task_worker(killed):
        on_ray = _tiny_search(iterations=8, entropy_resolution=160).run(executor=executor)
    assert killed, "no task was running when the killer looked: nothing was tested"
    _same(on_ray, local)


# --------------------------------------------------------------------------- sharded mAP
def test_sharded_map_on_ray_equals_single_process(executor: RayExecutor) -> None:
    from damo_plugins.core.artifact import load_model
    from damo_plugins.data.evaluate import dataset_for, evaluate_artifact
    from damo_plugins.data.sharded import evaluate_sharded, shard_ranges
    from damo_plugins.demo import embedded_checkpoint

    ckpt = embedded_checkpoint("damo-yolo-nano-synth.pt")
    assert ckpt is not None
    art = load_model(ckpt)
    cfg = SimpleNamespace(
        data="generated", split="val", images=24, seed=0, limit=None, conf=0.05, iou=0.7
    )
    dataset = dataset_for(cfg, art.input_shape[2])
    single = evaluate_artifact(art, dataset, cfg)
    assert single["mAP"] > 0.2  # a trained model: equality below is not 0 == 0
    sharded = evaluate_sharded(art, dataset, cfg, executor, shards=3, generated=(24, 0))
    assert sharded == single  # one COCO evaluation of the same detections: exactly equal
    # a worker SIGKILLed amid a shard: the shard is retried, the mAP unchanged, and the
    # killed worker's model folder is removed by the worker that replaces it
    killed: list[int] = []
    with killing_a_task_worker(killed):
        again = evaluate_sharded(art, dataset, cfg, executor, shards=3, generated=(24, 0))
    assert killed, "no shard was running when the killer looked: nothing was tested"
    assert again == single
    assert not list(Path(tempfile.gettempdir()).glob(f"damo-shard-model-w{killed[0]}-*"))
    assert [len(r) for r in shard_ranges(24, 3)] == [8, 8, 8]
    assert [len(r) for r in shard_ranges(5, 3)] == [2, 2, 1]


@pytest.mark.slow
def test_evaluate_step_with_workers_and_ray(ray_instance: Any, tmp_path: Path) -> None:
    """The ``evaluate`` recipe step: ``workers: 2`` on Ray and in local processes gives the
    default (single-process) step's mAP."""
    from damo_plugins.core.pipeline import run
    from damo_plugins.demo import embedded_checkpoint

    def map_of(step: dict[str, Any], out: str) -> float:
        recipe = {
            "model": str(embedded_checkpoint("damo-yolo-nano-synth.pt")),
            "steps": [{"evaluate": {"images": 20, **step}}],
        }
        res = run(recipe, output=tmp_path / out, log=lambda _: None)
        (ev,) = [s for s in res.report["steps"] if s.get("step") == "evaluate"]
        return ev["metrics"]["evaluation"]["mAP"]

    single = map_of({}, "single")
    assert single > 0.2
    assert map_of({"workers": 2, "ray": "local"}, "ray") == single
    assert map_of({"workers": 2, "ray": "none"}, "pool") == single  # local processes


# --------------------------------------------------------------------------- CLI
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SEARCH = [
    "nas",
    "search",
    "--score",
    "entropy",
    "--entropy-resolution",
    "64",
    "--entropy-batch",
    "2",
    "--repeats",
    "1",
    "--population",
    "8",
    "--seed",
    "5",
    "--budget-from",
    "t",
    "--layers",
    "20",
    "--no-progress",
]


def _best(folder: Path) -> tuple[Any, float]:
    report = json.loads((folder / "report.json").read_text())
    return json.loads((folder / "best.json").read_text()), report["best"]["score"]


def test_unreachable_address_is_one_clear_line(tmp_path: Path) -> None:
    proc = damo_opt(
        *SEARCH, "--iterations", "4", "--ray", f"127.0.0.1:{_free_port()}", "-o", str(tmp_path)
    )
    assert_clean_error(proc, "cannot reach the Ray cluster", "resume")


@pytest.mark.slow
def test_resume_after_the_driver_is_killed(tmp_path: Path) -> None:
    """SIGKILL the search mid-run (after a checkpoint), resume: same result as uninterrupted."""
    args = [*SEARCH, "--iterations", "96", "--checkpoint-every", "8", "--workers", "0"]
    whole = damo_opt(*args, "-o", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "damo_plugins.cli", *args, "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = out / "checkpoint.json"
    deadline = time.monotonic() + 240
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the search ended before it could be killed"
    at = json.loads(ckpt.read_text())["iteration"]
    assert 0 < at < 96
    resumed = damo_opt(*args, "-o", str(out), "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert _best(out) == _best(tmp_path / "whole")


class HeadNode:
    """``ray start --head`` on 127.0.0.1 in a private temp dir; stops only its processes."""

    def __init__(self, root: Path) -> None:
        self.port = _free_port()
        self.temp = root / "ray"
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token"}
        proc = subprocess.run(
            [
                "ray",
                "start",
                "--head",
                f"--port={self.port}",
                "--num-cpus=2",
                "--include-dashboard=false",
                "--node-ip-address=127.0.0.1",
                "--disable-usage-stats",
                f"--temp-dir={self.temp}",
            ],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=180,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]

    def processes(self) -> list[psutil.Process]:
        roots = []
        for p in psutil.process_iter(["cmdline"]):
            if any(str(self.temp) in part for part in p.info["cmdline"] or []):
                roots.append(p)
        found = {p.pid: p for p in roots}
        for p in roots:
            with_children = p.children(recursive=True) if p.is_running() else []
            found.update({c.pid: c for c in with_children})
        return list(found.values())

    def kill(self) -> None:
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                p.kill()


@pytest.fixture
def head_node() -> Iterator[HeadNode]:
    root = Path(tempfile.mkdtemp(prefix="dr", dir="/tmp"))  # short: socket paths are limited
    node = HeadNode(root)
    try:
        yield node
    finally:
        node.kill()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_address_form_equals_local_and_a_lost_cluster_resumes(
    head_node: HeadNode, tmp_path: Path
) -> None:
    """``--ray HOST:PORT`` on a head node: the same best structure and score as a local
    search; then the head dies mid-search: one clear line, a checkpoint, and ``--resume``
    (locally) ends exactly as the uninterrupted search."""
    args = [*SEARCH, "--iterations", "32", "--checkpoint-every", "1000"]
    args[args.index("--entropy-resolution") + 1] = "160"  # tasks long enough to kill amid
    local = damo_opt(*args, "--workers", "0", "-o", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr
    remote = damo_opt(
        *args, "--ray", head_node.address, "-o", str(tmp_path / "remote"), env=head_node.env
    )
    assert remote.returncode == 0, remote.stderr
    assert _best(tmp_path / "remote") == _best(tmp_path / "local")

    # the cluster is lost mid-search: kill the head node once the driver is scoring
    out = tmp_path / "lost"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "damo_plugins.cli",
            *args,
            "--ray",
            head_node.address,
            "-o",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=head_node.env,
    )
    # kill once children are being scored: two tasks at once (the initial structure's
    # score is one task, a batch of children is many)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if sum(_title(p).startswith("ray::_ray_task") for p in head_node.processes()) >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the search ended before the cluster could be lost"
    head_node.kill()
    _, err = proc.communicate(timeout=120)
    lost = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
    assert_clean_error(lost, "lost the Ray cluster", "--resume")
    assert (out / "checkpoint.json").exists()
    resumed = damo_opt(*args, "--workers", "0", "-o", str(out), "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert _best(out) == _best(tmp_path / "local")


def _title(p: psutil.Process) -> str:
    try:
        cmd = p.cmdline()
    except (psutil.Error, OSError):
        return ""
    return cmd[0] if cmd else ""
