"""``damo-opt nas``: JSON shape, search outputs, clear errors.

The console script is run as a real subprocess where the process boundary matters (the JSON
printed, exit status and one-line errors); the rest calls ``damo_plugins.cli.main`` in-process
to keep the suite fast.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from damo_plugins.cli import main
from damo_plugins.models.structure import load_structure
from damo_plugins.nas.score import madnas_structure
from damo_plugins.nas.structures import resolve_structure


def damo_opt(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("damo-opt")
    cmd = [exe] if exe else [sys.executable, "-m", "damo_plugins.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)


def test_score_json_shape() -> None:
    r = damo_opt("nas", "score", "t", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert set(data) == {"madnas", "layers", "params", "flops"}
    assert data["madnas"] == pytest.approx(madnas_structure(resolve_structure("t")))
    assert data["layers"] == 19


def test_score_entropy_json_shape(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["nas", "score", "t", "--json", "--score", "entropy", "--entropy-resolution", "64"]
    assert main([*argv, "--entropy-batch", "2", "--repeats", "1", "--workers", "0"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"madnas", "entropy", "layers", "params", "flops"}
    assert data["entropy"] == pytest.approx(data["madnas"], rel=0.05)


def test_search_writes_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["nas", "search", "--budget-from", "t", "--iterations", "3000", "--population", "32"]
    assert main([*argv, "-o", str(out), "--no-progress"]) == 0
    assert Path(capsys.readouterr().out.strip()) == out / "best.json"
    best = load_structure(out / "best.json")
    report = json.loads((out / "report.json").read_text())
    assert report["best"]["score"] == pytest.approx(madnas_structure(best))
    assert report["best"]["flops"] <= report["setup"]["budgets"]["flops"]
    assert report["iterations"] == 3000
    for name in ("best.txt", "report.md", "checkpoint.json", "curve.png"):
        assert (out / name).stat().st_size > 0
    # a second search into the same folder must not clobber it silently
    assert main(["nas", "search", "--budget-from", "t", "--iterations", "10", "-o", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_bad_structure_is_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("[{'class': 'ConvKXBNRELU', 'in': 3, 'out': -8, 's': 1, 'k': 3}]")
    r = damo_opt("nas", "score", str(bad))
    assert r.returncode == 2 and "must be positive" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_search_writes_the_train_command_and_recipe_that_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command in train.sh, run as written (plus a tiny generated data set), trains a
    detector whose backbone is the searched structure; detector.yaml validates."""
    import shlex

    import torch

    out = tmp_path / "run"
    argv = ["nas", "search", "--budget-from", "t", "--iterations", "300", "--population", "16"]
    assert main([*argv, "--resolution", "64", "-o", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    line = (out / "train.sh").read_text().strip().splitlines()[-1]
    words = shlex.split(line.replace('"${DATA:-data}"', shlex.quote(str(tmp_path / "data"))))
    assert words[:2] == ["damo-opt", "train"] and "--img-size" in words
    assert words[words.index("--img-size") + 1] == "64"
    extra = ["--generate", "--train-images", "4", "--val-images", "2", "--epochs", "1"]
    assert main([*words[1:], *extra, "--batch", "2", "--no-progress"]) == 0
    ckpt = torch.load(out / "train" / "best.pt", map_location="cpu", weights_only=True)
    assert ckpt["arch"]["builder"] == "damo-yolo"
    assert ckpt["arch"]["kwargs"]["backbone"] == load_structure(out / "best.json")
    capsys.readouterr()
    recipe = out / "detector.yaml"
    assert main(["run", str(recipe), "--dry-run"]) == 0
    assert "damo-yolo" in capsys.readouterr().out


def test_latency_table_from_another_resolution_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from damo_plugins.nas.analysis import analyzer_for
    from damo_plugins.nas.latency import LatencyTable

    an, g = analyzer_for(resolve_structure("t"), 320, True)
    entries = {op[:5]: 0.1 for op in an.ops(g)}
    table = tmp_path / "table.json"
    LatencyTable("torch", "CPU", 1, 0.05, entries, meta={"resolution": 320}).save(table)
    argv = ["nas", "search", "--budget-from", "t", "--iterations", "50", "--population", "8"]
    argv += ["--latency-table", str(table), "--no-progress"]
    assert main([*argv, "-o", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "profiled at 320 px" in err and "--allow-resolution-mismatch" in err
    assert not (tmp_path / "a" / "best.json").exists()
    # the same table at its own resolution, or with the explicit flag, is used
    assert main([*argv, "--resolution", "320", "-o", str(tmp_path / "b")]) == 0
    assert main([*argv, "--allow-resolution-mismatch", "-o", str(tmp_path / "c")]) == 0
    assert "not trustworthy" in capsys.readouterr().err
