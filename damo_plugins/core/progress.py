"""Progress of long steps, and backends kept quiet unless ``--verbose``.

Two things a user watching ``damo-opt`` needs, and that a log file must not drown in:

* **Progress** (:class:`Progress`, :func:`track`): on a terminal, a ``rich`` progress bar —
  but only once a step has run for ``min_seconds`` (~2 s), so quick steps print nothing; in
  a log (stderr not a TTY), one line when the step starts and one when it ends, with the
  time. Never a line per item: a 550-item NAS profile used to print "375/550" lines, and a
  progress bar drawn into a file is hundreds of lines of escape codes.
* **Quiet backends** (:func:`quiet_backends`): NNCF draws ``rich`` progress bars of its own
  (569 of them in one non-TTY quantization), INC logs raw INFO lines, torch's tracer warns
  about things the export already checks (``TracerWarning`` surfaced as ``damo-opt:
  warning:``). Inside the block those are held back: NNCF's and INC's loggers keep only
  errors, ``rich``'s global console (the one NNCF's bars use) is muted, and warnings raised
  from outside this project are recorded instead of printed. With ``--verbose``
  (:func:`set_verbose`, or ``DAMO_VERBOSE=1``) nothing is held back.

``rich`` is a dependency of the package (and of NNCF); it is imported only when a progress
bar is really drawn, so ``damo-opt --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

T = TypeVar("T")

#: loggers of backends whose INFO/WARNING lines mean nothing to a user of ``damo-opt``
BACKEND_LOGGERS = ("nncf", "neural_compressor", "onnxscript", "openvino", "onnxruntime")
# (and ``torch``, whose own log level ``damo-opt`` already sets to ERROR: see quiet_backends)
#: seconds a step runs before a progress bar appears on a terminal
MIN_SECONDS = 2.0
#: environment variable that carries ``--verbose`` (to worker processes too)
VERBOSE_ENV = "DAMO_VERBOSE"


def set_verbose(on: bool = True) -> None:
    """Show backend output (``--verbose``); kept in the environment so workers inherit it."""
    if on:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def _is_tty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{int(s // 60)} min {int(s % 60):02d} s"


#: the progress shown now (an inner one counts silently: two live bars would garble)
_ACTIVE: list[Progress] = []


class Progress:
    """Progress of one step of ``total`` items (``None``: unknown), as a context manager.

    ``advance(n)`` after each item. On a TTY a bar appears after ``min_seconds`` (a timer
    thread starts it, so a step stuck on its first item shows too); otherwise ``start`` and
    ``done`` lines go to ``stream`` (stderr by default). ``quiet=True`` prints nothing
    unless a bar is drawn (for helpers whose caller already logs the step).
    """

    def __init__(
        self,
        description: str,
        total: int | None = None,
        *,
        stream: IO[str] | None = None,
        min_seconds: float = MIN_SECONDS,
        unit: str = "items",
        quiet: bool = False,
    ) -> None:
        self.description = description
        self.total = total
        self.unit = unit
        self.min_seconds = min_seconds
        self.quiet = quiet
        self.completed = 0
        self._stream = stream
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._bar: Any = None
        self._task: Any = None
        self._t0 = 0.0
        self._tty = False
        self._nested = False

    @property
    def stream(self) -> IO[str]:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def shown(self) -> bool:
        """True once a progress bar has been drawn."""
        return self._bar is not None

    def __enter__(self) -> Progress:
        self._t0 = time.perf_counter()
        self._nested = bool(_ACTIVE)
        _ACTIVE.append(self)
        self._tty = _is_tty(self.stream)
        if self._nested:
            return self
        if self._tty:
            self._timer = threading.Timer(self.min_seconds, self._show)
            self._timer.daemon = True
            self._timer.start()
        elif not self.quiet:
            count = f" ({self.total} {self.unit})" if self.total is not None else ""
            self._line(f"{self.description}{count} ...")
        return self

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.completed += n
            if self._bar is not None:
                self._bar.update(self._task, completed=self.completed)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:  # under the lock: a timer firing now sees the step ended
            with contextlib.suppress(ValueError):
                _ACTIVE.remove(self)
            bar, self._bar = self._bar, None
        if bar is not None:
            bar.update(self._task, completed=self.completed)
            bar.stop()
        if self._nested or self._tty or self.quiet:
            return
        took = _seconds(time.perf_counter() - self._t0)
        done = f"{self.completed}/{self.total}" if self.total is not None else str(self.completed)
        # GeneratorExit: the consumer of track() took what it needed (NNCF reads a subset)
        stopped = exc_type is not None and not issubclass(exc_type, GeneratorExit)
        state = "stopped" if stopped else "done"
        self._line(f"{self.description}: {state}, {done} {self.unit} in {took}")

    def _line(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            print(text, file=self.stream, flush=True)

    def _show(self) -> None:
        """Start the bar (timer thread): the step has run for ``min_seconds``."""
        try:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress
        except ImportError:  # rich is a dependency; a broken install gets the plain lines
            self._line(f"{self.description} ...")
            return
        bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(file=self.stream),
            transient=False,
            # our log lines (stderr) print above the bar; stdout is left alone, it may carry
            # a --json document
            redirect_stdout=False,
        )
        with self._lock:
            if self not in _ACTIVE:  # the step ended while the timer fired
                return
            self._task = bar.add_task(self.description, total=self.total, completed=self.completed)
            bar.start()
            self._bar = bar


def track(
    items: Iterable[T],
    description: str,
    total: int | None = None,
    **kwargs: Any,
) -> Iterator[T]:
    """Iterate ``items`` with a :class:`Progress` (``total`` defaults to ``len(items)``)."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(description, total, **kwargs) as progress:
        for item in items:
            progress.advance()  # counted when handed out: a consumer may stop after it
            yield item


# ------------------------------------------------------------------ quiet backends
@dataclass
class Captured:
    """What :func:`quiet_backends` held back: log records and warnings, as text lines."""

    lines: list[str] = field(default_factory=list)


class _Hold(logging.Filter):
    """Logger filter: keep errors, hold back the rest (kept as text in ``captured``)."""

    def __init__(self, captured: Captured) -> None:
        super().__init__()
        self.captured = captured

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        with contextlib.suppress(Exception):
            self.captured.lines.append(f"{record.name}: {record.getMessage()}")
        return False


#: packages whose warning classes mark a backend's note wherever it points (torch's
#: ``TracerWarning`` points at the model's own ``forward``, inside this project)
BACKEND_PACKAGES = frozenset(
    {"torch", "nncf", "neural_compressor", "onnx", "onnxruntime", "onnxscript", "openvino"}
)


def _for_user(category: Any, filename: str) -> bool:
    """A warning raised by this project (or a plugin of it) is meant for the user; one of a
    backend's own warning classes, or one raised inside a backend, is not."""
    if str(getattr(category, "__module__", "")).split(".")[0] in BACKEND_PACKAGES:
        return False
    path = filename.replace("\\", "/")
    return "/damo_plugins/" in path or "/damo_" in path or "/adapters/" in path


@contextlib.contextmanager
def quiet_backends(verbose: bool | None = None) -> Iterator[Captured]:
    """Hold back backend progress bars, log lines and warnings inside the block.

    ``verbose`` (default: :func:`is_verbose`) shows everything. Errors always pass; warnings
    from this project's own code (a plugin that failed to load, an MLflow tracker that is
    down) pass too, since they are written for the user.
    """
    captured = Captured()
    if verbose if verbose is not None else is_verbose():
        yield captured
        return
    hold = _Hold(captured)
    # torch resets its loggers when it is imported (possibly inside this block); it reads
    # TORCH_LOGS then, and "-all" keeps them at ERROR. A user's own TORCH_LOGS wins.
    torch_env = "torch" not in sys.modules and "TORCH_LOGS" not in os.environ
    if torch_env:
        os.environ["TORCH_LOGS"] = "-all"
    loggers = [logging.getLogger(name) for name in (*BACKEND_LOGGERS, "torch")]
    # A logger's filter sees only records logged on that very logger; torch logs on child
    # loggers (``torch.utils._pytree``) whose records reach the handler torch puts on
    # ``torch``: filter the handlers the backends installed too.
    filtered: list[logging.Filterer] = [*loggers, *(h for lg in loggers for h in lg.handlers)]
    for f in filtered:
        f.addFilter(hold)
    console = None
    muted_before = False
    with contextlib.suppress(ImportError):
        # NNCF's bars use rich's global console; muting it mutes them (ours use their own)
        from rich import get_console

        console = get_console()
        muted_before = console.quiet
        console.quiet = True
    show = warnings.showwarning

    def showwarning(
        message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        if _for_user(category, filename):
            show(message, category, filename, lineno, file, line)
        else:
            captured.lines.append(f"{getattr(category, '__name__', 'Warning')}: {message}")

    try:
        with warnings.catch_warnings():
            warnings.showwarning = showwarning
            yield captured
    finally:
        for f in filtered:
            f.removeFilter(hold)
        if torch_env:
            os.environ.pop("TORCH_LOGS", None)
        if console is not None:
            console.quiet = muted_before
