"""What every script in ``benchmarks/`` shares, so that they measure and report alike.

* applying a pass: :func:`apply_pass` builds the registered pass and hands it to the step
  runner (:func:`damo_plugins.core.runner.run_step`), exactly as a recipe step is applied —
  input check, run, verification, timing of ``run`` alone, metrics;
* timing: interleaved rounds from :mod:`damo_plugins.lib.timing` (re-exported here), medians
  and speed-ups taken within a round;
* the machine: :func:`machine` / :func:`machine_line` from :mod:`damo_plugins.lib.machine`;
* the report: :func:`command` (the exact command line), :func:`md_table`, and
  :func:`write_section`, which writes a script's section into ``docs/benchmarks/*.md``.

Scripts import it as ``common`` (their own folder is on ``sys.path`` when run as
``python benchmarks/X.py``; a test importing a script by path puts it there first).
"""

from __future__ import annotations

import re
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

from damo_plugins.core.verbs import parse_model_args  # noqa: E402
from damo_plugins.lib.machine import describe, summary  # noqa: E402
from damo_plugins.lib.timing import (  # noqa: E402
    Interleaved,
    interleave,
    interleaved_timing,
    round_ratio,
)

if TYPE_CHECKING:  # pragma: no cover
    from damo_plugins.core.artifact import ModelArtifact
    from damo_plugins.core.manager import PluginManager
    from damo_plugins.core.runner import StepResult

__all__ = [
    "DOCS",
    "ROOT",
    "SHARED_MACHINE",
    "Interleaved",
    "apply_pass",
    "command",
    "interleave",
    "interleaved_timing",
    "log",
    "machine",
    "machine_line",
    "md_table",
    "packaged_checkpoint",
    "parse_model_args",
    "quiet",
    "round_ratio",
    "verdict",
    "write_section",
]

DOCS = ROOT / "docs" / "benchmarks"
#: said once per section: why the tables quote ratios rather than milliseconds
SHARED_MACHINE = (
    "The machine was shared with other jobs while this ran: absolute times are noisy; the "
    "ratios, measured side by side in interleaved rounds, are the figures to quote."
)
_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress on stderr, with the seconds since the script started (stdout is the report)."""
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def quiet(_msg: str) -> None:
    """A ``log`` for passes whose chatter the report does not need."""


# ------------------------------------------------------------------------------ passes
def apply_pass(
    mgr: PluginManager,
    name: str,
    config: dict[str, Any] | None,
    art: ModelArtifact,
    workdir: Path,
    *,
    log: Callable[[str], None] = log,
    verify: bool = True,
    seed: int = 0,
) -> StepResult:
    """Apply the registered pass ``name`` to ``art`` through the step runner.

    The result carries the new artifact, its verification (``None`` when ``verify`` is
    false), the seconds of ``run`` alone and the pass's metrics. A failed verification is
    returned, not raised: a benchmark reports it (see :func:`verdict`) and goes on.
    """
    from damo_plugins.core.passes import PassContext
    from damo_plugins.core.runner import run_step

    ctx = PassContext(manager=mgr, workdir=Path(workdir), seed=seed, verify=verify, log=log)
    return run_step(mgr.get_pass(name)(config or {}), art, ctx)


def verdict(res: StepResult) -> str:
    """``ok: <message>`` / ``verification FAILED: <message>`` / ``not verified``."""
    if res.verification is None:
        return "not verified"
    head = "ok: " if res.verification.passed else "verification FAILED: "
    return head + res.verification.message


def packaged_checkpoint() -> Path | None:
    """The trained small model shipped in ``damo_plugins/assets`` (the demo's first)."""
    from damo_plugins.demo import embedded_checkpoint

    found = embedded_checkpoint()
    if found is not None:
        return found
    assets = sorted((ROOT / "damo_plugins" / "assets").glob("*synth*.pt"))
    return assets[0] if assets else None


# ----------------------------------------------------------------------------- machine
def machine(openvino_precision: bool = True) -> dict[str, Any]:
    """:func:`damo_plugins.lib.machine.describe`, with OpenVINO's CPU default precision."""
    return describe(openvino_precision=openvino_precision)


def machine_line(info: dict[str, Any] | None = None, *, shared: bool = True) -> str:
    """``Machine: ...`` for a section, with the shared-machine caveat."""
    text = "Machine: " + summary(info if info is not None else machine())
    return f"{text} {SHARED_MACHINE}" if shared else text


# ------------------------------------------------------------------------------ report
def command(script: str | Path, argv: Sequence[str]) -> str:
    """The exact command that made a section: ``python benchmarks/<script> <args>``."""
    name = Path(script).name
    return " ".join(["python", f"benchmarks/{name}", *(shlex.quote(a) for a in argv)])


def md_table(head: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A Markdown table as lines (cells are ``str()``-ed; ``|`` inside a cell is escaped)."""

    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(head), "|" + "---|" * len(head), *(line(r) for r in rows)]


_SECTION_RE = re.compile(
    r"<!-- section: (?P<key>[^ ]+) -->\n(?P<body>.*?)<!-- /section -->\n", re.S
)


def write_section(
    doc: str | Path,
    text: str,
    *,
    key: str | None = None,
    header: str | None = None,
    sort: Callable[[str, str], Any] | None = None,
) -> Path:
    """Write a script's Markdown into ``doc`` (atomically) and return its path.

    Without ``key`` the file is the section. With ``key`` the section sits between
    ``<!-- section: KEY -->`` and ``<!-- /section -->``: a re-run replaces its own block
    and keeps everything else (hand-written notes, other keys' sections); a new key is
    appended. With ``header`` too, the file is rebuilt as ``header`` followed by every
    section, ordered by ``sort(key, body)`` (default: by key) — for a document made of
    sections only, such as one section per model and input size.
    """
    from damo_plugins.core.io import write_text

    path = Path(doc)
    body = text.rstrip("\n") + "\n"
    if key is None:
        out = body
    else:
        block = f"<!-- section: {key} -->\n{body}<!-- /section -->\n"
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        if header is not None:
            sections = {m.group("key"): m.group("body") for m in _SECTION_RE.finditer(old)}
            sections[key] = body
            order = sorted(sections, key=lambda k: sort(k, sections[k]) if sort else k)
            out = header.rstrip("\n") + "\n\n"
            out += "\n".join(
                f"<!-- section: {k} -->\n{sections[k]}<!-- /section -->\n" for k in order
            )
        else:
            found = [m for m in _SECTION_RE.finditer(old) if m.group("key") == key]
            if found:
                m = found[0]
                out = old[: m.start()] + block + old[m.end() :]
            else:
                out = (old.rstrip("\n") + "\n\n" if old.strip() else "") + block
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, out)
    return path
