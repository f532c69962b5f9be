"""Progress of long steps and quiet backends (issue 19 item 6: output spam).

* :class:`~damo_plugins.core.progress.Progress` draws a bar on a real terminal (a pty) only
  after ``min_seconds``, and writes a start and a done line (with the time) to a log;
* :func:`~damo_plugins.core.progress.quiet_backends` holds back backend log lines, NNCF's
  rich bars and backend warnings unless verbose, and lets errors and our own warnings pass;
* a real ``damo-opt quantize`` with NNCF, run without a terminal, prints a handful of lines
  and no progress bar; with ``--verbose`` NNCF's own lines are there.
"""

from __future__ import annotations

import io
import logging
import os
import select
import time
import warnings
from pathlib import Path

import pytest

from damo_plugins.core.progress import Progress, quiet_backends, track
from tests.conftest import damo_opt

BAR_CHARS = ("━", "█", "\x1b[")


def _read_pty(fd: int, wait: float = 0.3) -> str:
    out = b""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.05)
        if ready:
            try:
                out += os.read(fd, 65536)
            except OSError:
                break
    return out.decode("utf-8", "replace")


# -------------------------------------------------------------------------- Progress
def test_log_gets_a_start_and_a_done_line() -> None:
    log = io.StringIO()
    for _ in track(range(200), "evaluating", unit="images", stream=log):
        pass
    lines = log.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0] == "evaluating (200 images) ..."
    assert lines[1].startswith("evaluating: done, 200/200 images in ") and lines[1].endswith(" s")
    assert not any(c in log.getvalue() for c in BAR_CHARS)


def test_a_consumer_that_stops_early_is_done_not_stopped() -> None:
    log = io.StringIO()
    for i in track(range(100), "calibration samples", stream=log):
        if i == 9:
            break
    assert log.getvalue().splitlines()[-1].startswith("calibration samples: done, 10/100 items")
    log = io.StringIO()
    with pytest.raises(RuntimeError), Progress("step", 5, stream=log):
        raise RuntimeError("boom")
    assert "step: stopped, 0/5 items" in log.getvalue()


def test_terminal_shows_a_bar_only_for_a_long_step() -> None:
    master, slave = os.openpty()
    try:
        with os.fdopen(os.dup(slave), "w") as tty:
            assert tty.isatty()
            with Progress("quick", 10, stream=tty, min_seconds=5.0) as p:
                p.advance(10)
            assert _read_pty(master) == ""  # a quick step on a terminal prints nothing
            with Progress("profiling", 10, stream=tty, min_seconds=0.2) as p:
                p.advance(3)
                deadline = time.monotonic() + 10  # past min_seconds the timer draws the bar
                while not p.shown and time.monotonic() < deadline:  # (a loaded machine)
                    time.sleep(0.05)
                assert p.shown
                p.advance(7)
            screen = _read_pty(master, 0.5)
    finally:
        os.close(master)
        os.close(slave)
    assert "profiling" in screen and "10/10" in screen
    assert any(c in screen for c in BAR_CHARS)


def test_nested_progress_counts_silently() -> None:
    log = io.StringIO()
    with Progress("outer", 2, stream=log) as outer:
        for _ in track(range(3), "inner", stream=log):
            pass
        outer.advance(2)
    assert [ln.split(" ")[0] for ln in log.getvalue().splitlines()] == ["outer", "outer:"]


# -------------------------------------------------------------------- quiet_backends
class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_backend_logs_and_warnings_held_back_errors_and_ours_pass() -> None:
    import nncf  # noqa: F401  (its logger, with its own handler, as in a real run)
    import torch
    from rich import get_console

    nncf_log, inc_log = logging.getLogger("nncf"), logging.getLogger("neural_compressor")
    keep = _Keep()
    # as at the start of a run: NNCF at INFO (its import sets it), INC at INFO (its Logger
    # resets it); NNCF's own handler swapped for one we can read
    saved = (nncf_log.handlers[:], nncf_log.level, inc_log.level)
    nncf_log.handlers[:] = [keep]
    nncf_log.setLevel(logging.INFO)
    inc_log.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with quiet_backends(verbose=False) as held:
                assert get_console().quiet  # NNCF's bars draw on rich's global console
                nncf_log.info("Statistics collection")
                logging.getLogger("neural_compressor").warning("raw INC line")
                nncf_log.error("a real failure")
                warnings.warn("trace might be incorrect", torch.jit.TracerWarning, stacklevel=1)
                warnings.warn_explicit(
                    "plugin 'x' not loaded", UserWarning, "/site/damo_plugins/core/manager.py", 1
                )
            assert not get_console().quiet
    finally:
        nncf_log.handlers[:] = saved[0]
        nncf_log.setLevel(saved[1])
        inc_log.setLevel(saved[2])
    assert "nncf: Statistics collection" in held.lines
    assert "neural_compressor: raw INC line" in held.lines
    assert any("TracerWarning: trace might be incorrect" in ln for ln in held.lines)
    assert keep.messages == ["a real failure"]
    assert [str(w.message) for w in seen] == ["plugin 'x' not loaded"]
    assert not nncf_log.filters and not keep.filters  # nothing left behind


def test_verbose_holds_nothing_back() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_backends(verbose=True) as held:
            logging.getLogger("neural_compressor").warning("raw INC line")
            warnings.warn("backend note", DeprecationWarning, stacklevel=1)
    assert held.lines == []
    assert [str(w.message) for w in seen] == ["backend note"]


# ------------------------------------------------------------ a real run, no terminal
def test_quantize_with_nncf_is_quiet_in_a_log_and_verbose_on_request(tmp_path: Path) -> None:
    """NNCF drew 569 rich bars into a non-TTY log; now a few lines, bars only with --verbose."""
    args = ["quantize", "tiny-cnn", "--adapter", "nncf", "--calib", "generated"]
    args += ["--subset", "8", "--no-verify"]
    quiet = damo_opt(*args, "-o", tmp_path / "q")
    assert quiet.returncode == 0, quiet.stderr
    text = quiet.stdout + quiet.stderr
    assert not any(c in text for c in BAR_CHARS), text
    assert "Statistics collection" not in text and "INFO:nncf" not in text
    assert len(text.splitlines()) < 15, text
    assert "calibration samples" in text and "done, 8/8 samples in" in text

    loud = damo_opt(*args, "-o", tmp_path / "v", "--verbose")
    assert loud.returncode == 0, loud.stderr
    assert "Statistics collection" in loud.stdout + loud.stderr


def test_quantize_with_inc_shows_no_raw_backend_lines(tmp_path: Path) -> None:
    """INC logged raw "[INFO][...py:NN]" lines and torch glog-style "W1130 ..." warnings."""
    proc = damo_opt(
        "quantize",
        "tiny-cnn",
        "--adapter",
        "inc",
        "--calib",
        "generated",
        "--subset",
        "8",
        "--no-verify",
        "-o",
        tmp_path / "q",
    )
    assert proc.returncode == 0, proc.stderr
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) < 15, lines
    noise = [ln for ln in lines if "[INFO]" in ln or "[WARNING]" in ln or ln[:1] in ("W", "I")]
    assert noise == [], noise
