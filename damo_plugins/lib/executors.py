"""One way to run independent tasks: in this process, in a local process pool, or on Ray.

NAS candidate scoring, evaluation shards and (later) optimize candidates are lists of
independent, picklable tasks. They go through :class:`Executor` so the code that makes the
tasks never knows where they run:

* :class:`LocalExecutor` — a ``concurrent.futures`` process pool (``spawn``), or this very
  process with ``workers=0``. It is the default everywhere, as before Ray existed.
* :class:`RayExecutor` — Ray tasks (``ray.remote`` with ``max_retries``) on a private Ray
  instance started for this run (``local``), the cluster Ray finds (``auto``) or an address.

What both guarantee, and why:

* ``map`` returns results **in submission order** and ``as_completed`` yields ``(index,
  result)``, so a caller's result never depends on which worker finished first: NAS and
  sharded evaluation give the same numbers locally and on a cluster.
* A worker that dies (OOM killer, SIGKILL, a lost node) costs a **retry** of its tasks, not
  the run: Ray retries system failures itself (``max_retries``); the local pool is rebuilt
  and the unfinished tasks resubmitted (a broken ``ProcessPoolExecutor`` cannot be reused).
  Exceptions raised *by the task* are not retried by default — the tasks are deterministic,
  so a retry would fail the same way — and reach the caller as themselves.
* A lost cluster, a missing Ray, an unreachable address raise one :class:`ExecutorError`
  line (a :class:`~damo_plugins.core.errors.DamoError`) that says local state is kept; the
  callers that keep state (the NAS search checkpoint) say how to resume.

No scheduler, queue or RPC of our own: Ray and ``concurrent.futures`` do the work. Ray is
imported only inside :class:`RayExecutor`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from damo_plugins.core.errors import DamoError, first_line

#: the environment variable that names a Ray cluster when no ``--ray`` is given
RAY_ENV = "DAMO_RAY_ADDRESS"
#: optional JSON runtime environment for Ray workers (``{"py_modules": [...], ...}``)
RAY_RUNTIME_ENV = "DAMO_RAY_RUNTIME_ENV"

RESUME_HINT = "local state (search checkpoint, caches) is kept: the run can resume"


class ExecutorError(DamoError):
    """The execution backend failed (not the task): missing Ray, unreachable or lost cluster,
    a worker that kept dying. Callers holding state catch it to save and explain resuming."""


@dataclass(frozen=True)
class Resources:
    """What one task needs. ``cpus`` also sets the task's thread count (OMP/torch), so two
    tasks on a 2-core node do not each spin two threads. ``memory`` is in bytes; ``custom``
    names cluster resources such as a device label (``{"latency-device": 1}``) that only some
    nodes declare."""

    cpus: float = 1.0
    memory: int | None = None
    custom: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cpus <= 0:
            raise DamoError(f"a task needs a positive number of CPUs, got {self.cpus}")
        if self.memory is not None and self.memory <= 0:
            raise DamoError(f"a task's memory must be positive, got {self.memory}")

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus))


def _machine_cpus() -> int:
    """The CPUs this process may use (its affinity mask, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def default_workers() -> int:
    """Local worker processes: the CPUs this process may use, at most 4 (more spawn cost
    than gain for the small tasks here)."""
    return max(1, min(4, _machine_cpus()))


def _limit_threads(n: int) -> None:
    """Inside a worker: ``n`` intra-op threads. The environment variables cover libraries
    imported later; torch, if already imported in a reused worker, is told directly."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """``n`` torch intra-op threads in this process for a while (restored afterwards)."""
    try:
        import torch
    except ImportError:  # tasks without torch: nothing to pin
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _call(fn: Callable[..., Any], shared: Any, has_shared: bool, item: Any) -> Any:
    return fn(shared, item) if has_shared else fn(item)


class Executor:
    """Run ``fn`` over independent items; results in submission order.

    ``fn`` must be a module-level function (pickled by reference) and items picklable.
    With ``shared``, ``fn(shared, item)`` is called: ``shared`` is sent once per worker
    (Ray: one object in the object store) instead of once per task — for a model or a
    data-set description every task needs.
    """

    kind = "executor"

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def workers(self) -> int:
        """How many tasks run at once (for choosing a shard count)."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def as_completed(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        *,
        shared: Any = None,
        resources: Resources | None = None,
    ) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, result)`` as tasks finish (index = position in ``items``)."""
        raise NotImplementedError

    def map(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        *,
        shared: Any = None,
        resources: Resources | None = None,
    ) -> list[Any]:
        items = list(items)
        out: list[Any] = [None] * len(items)
        for i, r in self.as_completed(fn, items, shared=shared, resources=resources):
            out[i] = r
        return out

    def close(self) -> None:
        """Release workers (idempotent)."""


# ------------------------------------------------------------------------------- local
class LocalExecutor(Executor):
    """A process pool on this machine (``workers=0``: this process, no pool).

    The pool is created on first use and kept until :meth:`close`, so a search scoring a
    batch after another does not pay the ``spawn`` start-up (torch import) every batch.
    ``resources`` declares what this machine has beyond CPUs (e.g. a device label); a task
    asking for a custom resource not declared here is refused rather than run on the wrong
    hardware.
    """

    kind = "local"

    def __init__(
        self,
        workers: int | None = None,
        *,
        retries: int = 2,
        resources: Mapping[str, float] | None = None,
    ) -> None:
        self._workers = default_workers() if workers is None else max(0, int(workers))
        self.retries = max(0, int(retries))
        self.resources = dict(resources or {})
        self._pool: Any = None
        self._pool_threads = 0

    @property
    def workers(self) -> int:
        return max(1, self._workers)

    @property
    def in_process(self) -> bool:
        """True with ``workers=0``: tasks run one after the other in this process."""
        return self._workers == 0

    def describe(self) -> str:
        if self._workers == 0:
            return "this process"
        return f"local process pool ({self._workers} workers)"

    def _check(self, res: Resources) -> None:
        for name, amount in res.custom.items():
            if self.resources.get(name, 0) < amount:
                raise DamoError(
                    f"this machine does not declare resource {name!r} (a task needs {amount})",
                    "run on a Ray cluster whose node declares it (ray start --resources), "
                    "or run where the device is",
                )

    def _get_pool(self, threads: int) -> Any:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        if self._pool is not None and self._pool_threads != threads:
            self._shutdown_pool()
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self._workers,
                mp_context=get_context("spawn"),
                initializer=_limit_threads,
                initargs=(threads,),
            )
            self._pool_threads = threads
        return self._pool

    def _shutdown_pool(self, kill: bool = False) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if kill:  # a broken pool: its processes may hang on a dead sibling's pipe
            for p in list(getattr(pool, "_processes", {}).values()):
                if p.is_alive():
                    p.kill()
        pool.shutdown(wait=True, cancel_futures=True)

    def as_completed(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        *,
        shared: Any = None,
        resources: Resources | None = None,
    ) -> Iterator[tuple[int, Any]]:
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        res = resources or Resources()
        self._check(res)
        items = list(items)
        has_shared = shared is not None
        if self._workers == 0 or (len(items) <= 1 and self._pool is None):
            # the same intra-op thread count as a worker would use: float summation order
            # (and so a score's last bits) must not depend on where a task ran
            with _threads(res.threads):
                for i, item in enumerate(items):
                    yield i, _call(fn, shared, has_shared, item)
            return
        todo = set(range(len(items)))
        failures = 0
        while todo:
            pool = self._get_pool(res.threads)
            futures = {
                pool.submit(_call, fn, shared, has_shared, items[i]): i for i in sorted(todo)
            }
            broken = False
            try:
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in sorted(done, key=futures.__getitem__):
                        i = futures[fut]
                        try:
                            result = fut.result()
                        except BrokenProcessPool:
                            broken = True
                            continue
                        todo.discard(i)
                        yield i, result
                    if broken:
                        break
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
            if broken:
                failures += 1
                self._shutdown_pool(kill=True)
                if failures > self.retries:
                    raise ExecutorError(
                        f"a local worker process died {failures} times "
                        f"({len(todo)} task(s) unfinished)",
                        "out of memory? try fewer --workers; " + RESUME_HINT,
                    )

    def close(self) -> None:
        self._shutdown_pool()


# --------------------------------------------------------------------------------- ray
def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a ``HOST:PORT`` nobody listens on: ``ray.init`` retries such an address
    for minutes, printing warnings, before it gives up."""
    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise ExecutorError(
            f"cannot reach the Ray cluster at {address}: {first_line(exc)}",
            "check the address (ray status on the head node) or run without --ray; " + RESUME_HINT,
        ) from None


def _ray_task(
    fn: Callable[..., Any], threads: int, shared: Any, has_shared: bool, item: Any
) -> Any:
    _limit_threads(threads)
    return _call(fn, shared, has_shared, item)


def _ray_probe() -> dict[str, str]:
    """What a worker runs first: can it import this project, and which version is it?"""
    import damo_plugins

    return {"damo_plugins": damo_plugins.__version__, "python": sys.version.split()[0]}


class RayExecutor(Executor):
    """Ray tasks on a cluster.

    ``address``: ``local`` starts a private Ray instance for this run (all the machine's
    CPUs, no dashboard) and stops it on :meth:`close`; ``auto`` joins the cluster Ray finds
    (``RAY_ADDRESS`` or a ``ray start`` on this machine); anything else is a cluster
    address (``HOST:PORT`` or ``ray://HOST:PORT``). If this process is already connected to
    Ray, that connection is used and left open.

    A worker killed mid-task is retried by Ray (``retries`` = ``max_retries``). The driver
    checks between waits that the cluster's GCS still answers; when it does not for
    ``lost_after`` seconds it raises :class:`ExecutorError` — Ray itself would otherwise
    terminate this process about a minute later without a Python exception.
    """

    kind = "ray"

    def __init__(
        self,
        address: str = "local",
        *,
        retries: int = 3,
        retry_exceptions: bool | list[type[BaseException]] = False,
        runtime_env: Mapping[str, Any] | None = None,
        num_cpus: int | None = None,
        lost_after: float = 5.0,
        poll: float = 0.5,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise ExecutorError(
                "Ray is not installed", "pip install 'damo-plugins[ray]' (or run without --ray)"
            ) from None
        self._ray = ray
        self.address = address
        self.retries = max(0, int(retries))
        self.retry_exceptions = retry_exceptions
        self.lost_after = lost_after
        self.poll = poll
        self._owned = False
        self._closed = False
        if ray.is_initialized():
            self._mode = "existing connection"
        else:
            self._connect(address, runtime_env, num_cpus)
            self._owned = True
        self._gcs = self._gcs_address()
        self._remote = ray.remote(_ray_task)
        self._check_workers()

    # ---------------------------------------------------------------- connection
    def _connect(
        self, address: str, runtime_env: Mapping[str, Any] | None, num_cpus: int | None
    ) -> None:
        ray = self._ray
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": "ERROR",
        }
        if runtime_env is None and os.environ.get(RAY_RUNTIME_ENV):
            import json

            try:
                runtime_env = json.loads(os.environ[RAY_RUNTIME_ENV])
            except ValueError as exc:
                raise ExecutorError(f"{RAY_RUNTIME_ENV} is not JSON ({exc})") from None
        if runtime_env:
            kwargs["runtime_env"] = dict(runtime_env)
        if address == "local":
            kwargs.update(address="local", num_cpus=num_cpus or _machine_cpus())
            self._mode = "private Ray instance"
        else:
            kwargs["address"] = address
            kwargs.pop("include_dashboard")
            self._mode = f"Ray cluster at {address}"
            _check_reachable(address)
        try:
            ray.init(**kwargs)
        except ImportError as exc:
            raise ExecutorError(f"Ray cannot start: {first_line(exc)}") from None
        except Exception as exc:  # ConnectionError, AuthenticationError, RuntimeError, ValueError
            text, cause = str(exc), exc.__cause__
            while cause is not None:  # Ray wraps the AuthenticationError in a ConnectionError
                text, cause = f"{text} {cause}", cause.__cause__
            if "uthentication" in text or "auth_token" in text.lower():
                raise ExecutorError(
                    f"the Ray cluster at {address} refused this driver: token authentication",
                    "set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN or "
                    "~/.ray/auth_token)",
                ) from None
            where = (
                "a private Ray instance" if address == "local" else f"the Ray cluster at {address}"
            )
            raise ExecutorError(
                f"cannot reach {where}: {first_line(exc)}",
                "check the address (ray status on the head node) or run without --ray; "
                + RESUME_HINT,
            ) from None

    def _gcs_address(self) -> tuple[str, int] | None:
        try:
            host, port = self._ray.get_runtime_context().gcs_address.rsplit(":", 1)
            return host.strip("[]"), int(port)
        except Exception:  # ray:// client mode has no GCS address here
            return None

    def _gcs_alive(self) -> bool:
        if self._gcs is None:
            return True
        try:
            socket.create_connection(self._gcs, timeout=2.0).close()
            return True
        except OSError:
            return False

    def _check_workers(self) -> None:
        """One probe task: the workers can import this project, at this driver's version.

        A different version on the cluster would silently change scores; a missing one
        would fail every task with an ImportError deep inside Ray."""
        import damo_plugins

        ray = self._ray
        try:
            ref = ray.remote(_ray_probe).options(num_cpus=0, max_retries=self.retries).remote()
            info = self._get_one(ref, "starting a Ray worker", timeout=300.0)
        except ExecutorError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise ExecutorError(
                f"Ray workers cannot run this project's code: {first_line(exc)}",
                f"install damo-plugins {damo_plugins.__version__} on the cluster's nodes or "
                f"pass a runtime environment ({RAY_RUNTIME_ENV}='{{\"py_modules\": [...]}}')",
            ) from None
        if info["damo_plugins"] != damo_plugins.__version__:
            self.close()
            raise ExecutorError(
                f"the Ray workers run damo-plugins {info['damo_plugins']}, this driver "
                f"{damo_plugins.__version__}",
                "install the same version on the cluster (results would differ otherwise)",
            )

    def _get_one(self, ref: Any, what: str, timeout: float) -> Any:
        t0 = time.monotonic()
        while True:
            done, _ = self._ray.wait([ref], timeout=self.poll)
            if done:
                return self._result(ref)
            self._check_alive()
            if time.monotonic() - t0 > timeout:
                raise ExecutorError(
                    f"{what} took more than {timeout:.0f} s on {self._mode}",
                    "does the cluster have a free CPU (ray status)?",
                )

    # ---------------------------------------------------------------- describe
    @property
    def workers(self) -> int:
        try:
            return max(1, int(self._ray.cluster_resources().get("CPU", 1)))
        except Exception:
            return 1

    def describe(self) -> str:
        return f"{self._mode} ({self.workers} CPUs)"

    # ---------------------------------------------------------------- running
    def _check_feasible(self, res: Resources) -> None:
        """Ray waits forever for a resource no node has; refuse such a task up front."""
        need = {"CPU": res.cpus, **dict(res.custom)}
        if res.memory:
            need["memory"] = float(res.memory)
        try:
            nodes = [n.get("Resources", {}) for n in self._ray.nodes() if n.get("Alive")]
        except Exception:
            return
        if not any(all(node.get(k, 0) >= v for k, v in need.items()) for node in nodes):
            wanted = ", ".join(f"{k}={v:g}" for k, v in need.items())
            raise ExecutorError(
                f"no node of the Ray cluster has {wanted} for one task",
                "start a node with these resources (ray start --num-cpus/--resources) or ask "
                "for less",
            )

    def _check_alive(self) -> None:
        t0 = time.monotonic()
        while not self._gcs_alive():
            if time.monotonic() - t0 >= self.lost_after:
                raise ExecutorError(
                    f"lost the Ray cluster ({self._mode}: its GCS at "
                    f"{self._gcs[0]}:{self._gcs[1]} stopped answering)",  # type: ignore[index]
                    RESUME_HINT,
                )
            time.sleep(0.5)

    def _result(self, ref: Any) -> Any:
        ray = self._ray
        exc_mod = ray.exceptions
        try:
            return ray.get(ref)
        except exc_mod.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, BaseException):
                raise cause from None
            raise
        except (
            exc_mod.WorkerCrashedError,
            exc_mod.NodeDiedError,
            exc_mod.ObjectLostError,
            exc_mod.LocalRayletDiedError,
            exc_mod.RaySystemError,
            exc_mod.RuntimeEnvSetupError,
            exc_mod.OutOfMemoryError,
            exc_mod.TaskUnschedulableError,
        ) as exc:
            raise ExecutorError(
                f"a Ray task failed {self.retries + 1} time(s): {type(exc).__name__}: "
                f"{first_line(exc)[:200]}",
                RESUME_HINT,
            ) from None

    def as_completed(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        *,
        shared: Any = None,
        resources: Resources | None = None,
    ) -> Iterator[tuple[int, Any]]:
        if self._closed:
            raise ExecutorError("the Ray executor is closed")
        ray = self._ray
        res = resources or Resources()
        self._check_feasible(res)
        items = list(items)
        if not items:
            return
        options: dict[str, Any] = {
            "num_cpus": res.cpus,
            "max_retries": self.retries,
            "retry_exceptions": self.retry_exceptions,
        }
        if res.memory:
            options["memory"] = int(res.memory)
        if res.custom:
            options["resources"] = dict(res.custom)
        remote = self._remote.options(**options)
        has_shared = shared is not None
        shared_ref = ray.put(shared) if has_shared else None
        refs = {
            remote.remote(fn, res.threads, shared_ref, has_shared, item): i
            for i, item in enumerate(items)
        }
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
                if not done:
                    done, pending = ray.wait(pending, num_returns=1, timeout=self.poll)
                if not done:
                    self._check_alive()
                    continue
                for ref in done:
                    yield refs[ref], self._result(ref)
        finally:
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owned and self._ray.is_initialized():
            self._ray.shutdown()


# --------------------------------------------------------------------------- choosing
def ray_address(option: str | None) -> str | None:
    """The Ray address to use: the option if given, else ``DAMO_RAY_ADDRESS``, else ``None``
    (run locally). An empty string or ``none`` in either means local."""
    value = option if option is not None else os.environ.get(RAY_ENV)
    if value is None:
        return None
    value = value.strip()
    if value.lower() in ("", "none", "off", "no"):
        return None
    return value


def open_executor(
    ray: str | None = None, workers: int | None = None, *, retries: int | None = None
) -> Executor:
    """A :class:`RayExecutor` when ``ray`` (or ``DAMO_RAY_ADDRESS``) names a cluster, else a
    :class:`LocalExecutor` with ``workers`` processes (``None``: CPUs, max 4; ``0``: this
    process). Use it as a context manager so a private Ray instance is always stopped."""
    address = ray_address(ray)
    if address is None:
        return LocalExecutor(workers, retries=2 if retries is None else retries)
    return RayExecutor(address, retries=3 if retries is None else retries)
