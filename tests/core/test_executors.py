"""The executor interface (damo_plugins.lib.executors), local side: order, shared data,
retries after a killed worker, resource checks, choosing an executor. Ray's side is in
tests/plugins/test_ray.py (it needs a Ray instance)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from damo_plugins.core.errors import DamoError
from damo_plugins.lib.executors import (
    RAY_ENV,
    ExecutorError,
    LocalExecutor,
    Resources,
    open_executor,
    ray_address,
)


def square_after(item: tuple[int, float]) -> tuple[int, int]:
    """Sleep, then return (x*x, pid): the sleep lets later tasks finish first."""
    x, delay = item
    time.sleep(delay)
    return x * x, os.getpid()


def scaled(shared: dict, x: int) -> int:
    return shared["k"] * x


def fail_on_three(x: int) -> int:
    if x == 3:
        raise DamoError("three is not allowed")
    return x


def slow_marked(item: tuple[int, str]) -> int:
    """Write a marker file while running, so a test knows which process to kill."""
    x, folder = item
    marker = Path(folder) / f"{os.getpid()}.running"
    marker.write_text(str(x))
    time.sleep(1.5)
    marker.unlink()
    return x + 100


def test_results_in_submission_order_and_as_completed_indices() -> None:
    items = [(0, 1.0), (1, 0.0), (2, 0.5), (3, 0.0)]  # later items finish first
    with LocalExecutor(2) as ex:
        assert [r[0] for r in ex.map(square_after, items)] == [0, 1, 4, 9]
        seen = dict(ex.as_completed(square_after, items))
        assert {i: r[0] for i, r in seen.items()} == {0: 0, 1: 1, 2: 4, 3: 9}
        pids = {r[1] for r in ex.map(square_after, items)}
    assert os.getpid() not in pids  # really ran in worker processes


def test_in_process_and_shared_argument() -> None:
    with LocalExecutor(0) as ex:
        assert ex.describe() == "this process"
        assert ex.map(square_after, [(3, 0.0)]) == [(9, os.getpid())]
        assert ex.map(scaled, [1, 2, 3], shared={"k": 10}) == [10, 20, 30]
    with LocalExecutor(2) as ex:
        assert ex.map(scaled, [1, 2, 3], shared={"k": 10}) == [10, 20, 30]


def test_task_exception_reaches_the_caller_as_itself() -> None:
    with LocalExecutor(2) as ex, pytest.raises(DamoError, match="three is not allowed"):
        ex.map(fail_on_three, range(5))


def test_killed_worker_is_retried_and_results_unchanged(tmp_path: Path) -> None:
    """SIGKILL a pool worker while it runs a task: the pool is rebuilt, the unfinished tasks
    run again, and the results are those of an undisturbed run."""
    items = [(i, str(tmp_path)) for i in range(6)]
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            for marker in tmp_path.glob("*.running"):
                pid = int(marker.stem)
                if pid in {p.pid for p in psutil.Process().children(recursive=True)}:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.05)

    t = threading.Thread(target=killer)
    t.start()
    with LocalExecutor(2, retries=2) as ex:
        results = ex.map(slow_marked, items)
    t.join()
    assert killed, "no worker was killed: the test did not test anything"
    assert results == [i + 100 for i in range(6)]


def test_a_worker_that_keeps_dying_is_a_clear_error(tmp_path: Path) -> None:
    with LocalExecutor(1, retries=0) as ex:
        stop = threading.Event()

        def killer() -> None:
            while not stop.is_set():
                for marker in tmp_path.glob("*.running"):
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(marker.stem), signal.SIGKILL)
                time.sleep(0.05)

        t = threading.Thread(target=killer, daemon=True)
        t.start()
        try:
            with pytest.raises(ExecutorError, match=r"died 1 times.*resume"):
                ex.map(slow_marked, [(1, str(tmp_path)), (2, str(tmp_path))])
        finally:
            stop.set()
            t.join()


def test_custom_resource_this_machine_lacks_is_refused() -> None:
    with LocalExecutor(0) as ex, pytest.raises(DamoError, match="does not declare resource"):
        ex.map(scaled, [1], shared={"k": 1}, resources=Resources(custom={"npu": 1}))
    with LocalExecutor(0, resources={"npu": 1}) as ex:
        assert ex.map(scaled, [2], shared={"k": 1}, resources=Resources(custom={"npu": 1})) == [2]
    with pytest.raises(DamoError, match="positive"):
        Resources(cpus=0)


def test_choosing_an_executor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RAY_ENV, raising=False)
    assert ray_address(None) is None
    assert ray_address("auto") == "auto"
    monkeypatch.setenv(RAY_ENV, "10.0.0.1:6379")
    assert ray_address(None) == "10.0.0.1:6379"
    assert ray_address("none") is None  # an explicit 'none' wins over the environment
    monkeypatch.setenv(RAY_ENV, "")
    ex = open_executor(None, 0)
    assert isinstance(ex, LocalExecutor) and ex.describe() == "this process"


def test_missing_ray_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ExecutorError, match="Ray is not installed") as info:
        open_executor("local")
    assert "damo-plugins[ray]" in str(info.value)
