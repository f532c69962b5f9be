"""The output folder belongs to the user; the tool owns only what it wrote there.

Real processes for the faults: two concurrent runs, SIGTERM and SIGKILL in the middle of a
step, then a re-run. The slow step is a real plugin distribution (``sleepy``) that writes a
partial file into its temporary folder and sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from damo_plugins.core.errors import DamoError
from damo_plugins.core.manager import PluginManager
from damo_plugins.core.output import BOOKKEEPING, MANIFEST, OutputFolder
from damo_plugins.core.pipeline import run
from tests.conftest import assert_clean_error, damo_opt


def _quiet(_: str) -> None:
    pass


def _leftovers(folder: Path) -> list[str]:
    return sorted(
        p.name for p in folder.iterdir() if p.name.startswith(".") and p.name not in BOOKKEEPING
    )


def _start(recipe: Path, out: Path) -> subprocess.Popen[str]:
    """Start a run and return once its slow step is running."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "damo_plugins.cli", "run", str(recipe), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    deadline = time.time() + 240
    for line in proc.stdout:  # type: ignore[union-attr]
        if "SLEEPY-STARTED" in line:
            return proc
        if time.time() > deadline:
            break
    proc.kill()
    raise AssertionError(f"the slow step never started: {proc.stderr.read()}")  # type: ignore[union-attr]


def test_force_removes_only_what_the_tool_wrote(tmp_path: Path) -> None:
    """`-o . --force` in a folder holding other people's NN-named folders keeps them."""
    (tmp_path / "2024-photos").mkdir()
    (tmp_path / "2024-photos" / "a.jpg").write_bytes(b"jpeg")
    (tmp_path / "07-notes").mkdir()
    (tmp_path / "07-notes" / "n.txt").write_text("mine")
    (tmp_path / "r.yaml").write_text("model: tiny-cnn\nsteps: [export, convert]\n")
    assert_clean_error(damo_opt("run", "r.yaml", "-o", ".", cwd=tmp_path), "files it did not write")
    for _ in range(2):  # first run, then a forced re-run over its own outputs
        proc = damo_opt("run", "r.yaml", "-o", ".", "--force", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "2024-photos" / "a.jpg").read_bytes() == b"jpeg"
    assert (tmp_path / "07-notes" / "n.txt").read_text() == "mine"
    assert (tmp_path / "r.yaml").is_file()
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert sorted(manifest["entries"]) == [
        "01-export",
        "02-convert",
        "report.json",
        "report.md",
        "report.png",
    ]
    # a shorter forced re-run removes the old run's step folders, still nothing else
    (tmp_path / "r.yaml").write_text("model: tiny-cnn\nsteps: [export]\n")
    assert damo_opt("run", "r.yaml", "-o", ".", "--force", cwd=tmp_path).returncode == 0
    assert not (tmp_path / "02-convert").exists()
    assert (tmp_path / "07-notes").is_dir() and (tmp_path / "2024-photos").is_dir()


def test_output_holding_the_input_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(
        {"model": "tiny-cnn", "steps": ["export", "convert"]},
        output=out,
        manager=PluginManager(),
        log=_quiet,
    )
    xml = out / "02-convert" / "model.xml"
    before = xml.read_bytes()
    with pytest.raises(DamoError, match="holds the run's input"):
        run(
            {"model": str(xml), "steps": [{"benchmark": {"iterations": 1}}]},
            output=out,
            force=True,
            manager=PluginManager(),
            log=_quiet,
        )
    with pytest.raises(DamoError, match="holds the run's input"):
        run(
            {"model": str(xml), "steps": [{"benchmark": {"iterations": 1}}]},
            output=xml.parent,
            force=True,
            manager=PluginManager(),
            log=_quiet,
        )
    assert xml.read_bytes() == before


def test_a_failed_report_alone_does_not_need_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(DamoError):  # verification cannot run: input shape unknown for quantize
        run(
            {"model": "tiny-cnn", "steps": [{"export": {"tolerance": 1e-30}}]},
            output=out,
            manager=PluginManager(),
            log=_quiet,
        )
    assert json.loads((out / "report.json").read_text())["status"] == "failed"
    res = run(
        {"model": "tiny-cnn", "steps": ["export"]}, output=out, manager=PluginManager(), log=_quiet
    )
    assert res.report["status"] == "ok"


def test_concurrent_runs_are_refused_and_a_killed_run_is_recovered(
    tmp_path: Path, sleepy: Path
) -> None:
    out = tmp_path / "out"
    first = _start(sleepy, out)
    try:
        second = damo_opt("run", str(sleepy), "-o", str(out), "--force")
        assert_clean_error(second, "in use by another run", f"pid {first.pid}")
        assert json.loads((out / "report.json").read_text())["status"] == "running"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    # the killed run left its temporary step folder; it is recorded as the tool's own
    assert _leftovers(out), "expected the killed step's temporary folder"
    plain = damo_opt("run", str(sleepy), "-o", str(out))
    assert_clean_error(plain, "outputs of an earlier run", "--force")
    recipe = tmp_path / "fast.yaml"
    recipe.write_text("model: tiny-cnn\nsteps: [export, convert]\n")
    proc = damo_opt("run", str(recipe), "-o", str(out), "--force")
    assert proc.returncode == 0, proc.stderr
    assert _leftovers(out) == []
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "01-export",
        "02-convert",
        "report.json",
        "report.md",
        "report.png",
    ]


def test_sigterm_stops_cleanly(tmp_path: Path, sleepy: Path) -> None:
    out = tmp_path / "out"
    proc = _start(sleepy, out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "terminated" in err
    rep = json.loads((out / "report.json").read_text())
    assert rep["status"] == "interrupted"
    assert [s["step"] for s in rep["steps"]] == ["input", "export"]
    assert _leftovers(out) == []
    assert json.loads((out / MANIFEST).read_text())["pending"] == []


def test_manifest_cannot_name_paths_outside_the_folder(tmp_path: Path) -> None:
    """A tampered manifest must not make --force delete anything outside (or the folder)."""
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (out / MANIFEST).write_text(
        json.dumps({"entries": ["../victim.txt", "..", "/etc"], "pending": ["../victim.txt"]})
    )
    with OutputFolder(out) as folder:
        folder.claim(force=True)
    assert victim.read_text() == "keep"
