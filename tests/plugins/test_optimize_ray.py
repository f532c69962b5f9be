"""``optimize`` on a real local Ray cluster: the same table as a local run (with a worker
SIGKILLed mid-candidate), a cache shared with the driver, and a resume after the driver was
SIGKILLed.

Small on purpose (the whole CI must stay under 20 minutes): the embedded model, 16 + 16
generated images, a space of fuse + ONNX Runtime INT8 deployed in ONNX Runtime (three
candidates, plus the OpenVINO IR of the baseline), one short latency round. Latency is not
compared between runs — it is measured, and this machine is shared; every mAP must be equal
exactly (the same models, evaluated by the same code at the same thread count).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from damo_plugins.core.errors import DamoError
from damo_plugins.optimize import optimize
from tests.plugins.test_ray import head_node, killing_a_task_worker, ray_instance  # noqa: F401 (fixtures)

MODEL = str(
    Path(__file__).resolve().parents[2] / "damo_plugins" / "assets" / "damo-yolo-nano-synth.pt"
)
DATA = "synthetic:16,16"
SPACE = {
    "quantizers": ["onnxruntime"],
    "runtimes": ["onnxruntime"],
    "calibration": 8,
    "control": 8,
    "held_out": 8,
    "rounds": 1,
    "slot_seconds": 0.05,
    "task_cpus": 1,  # the same torch thread count here and in Ray workers
}


def _table(report: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
    """What must not depend on where a candidate was built: everything but latency."""
    return {
        r["name"]: (
            r["chain"],
            r["precision"],
            r["params"],
            r["flops"],
            r["size_bytes"],
            r["mAP"],
            r["mAP50"],
            r["control_mAP"],
        )
        for r in report["rows"]
    }


def _entries(cache: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in cache.glob("*/entry.json")}


@pytest.mark.slow
def test_optimize_on_ray_equals_local_and_shares_its_cache(
    ray_instance: Any,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DAMO_RAY_ADDRESS", raising=False)
    lines: list[str] = []
    local = optimize(MODEL, DATA, space=SPACE, output=tmp_path / "local", log=lambda _: None)
    killed: list[int] = []  # a worker SIGKILLed amid a candidate: retried, table unchanged
    with killing_a_task_worker(killed):
        on_ray = optimize(
            MODEL, DATA, space=SPACE, output=tmp_path / "ray", ray="local", log=lines.append
        )
    assert killed, "no candidate was being built when the killer looked: nothing was tested"
    assert local.report["executor"] == "this process"
    assert on_ray.report["executor"].startswith("existing connection")  # the module's Ray
    table = _table(local.report)
    assert len(table) == 3 and any("quantize" in v[0] for v in table.values())
    assert all(v[5] is not None and v[5] > 0.15 for v in table.values())  # a trained model
    assert _table(on_ray.report) == table  # same candidates, same mAP exactly
    assert on_ray.report["cache"]["cached"] == 0
    # built and evaluated before any timing: timing is alone on the device
    first_timed = next(i for i, s in enumerate(lines) if s.startswith("[1/"))
    assert not any(s.startswith("  mAP ") for s in lines[first_timed:])

    # the cache the cluster wrote is the driver's: resumed here, nothing is recomputed
    before = _entries(tmp_path / "ray" / "cache")
    again = optimize(
        MODEL, DATA, space=SPACE, output=tmp_path / "ray", resume=True, log=lambda _: None
    )
    assert again.report["cache"]["computed"] == 0
    assert again.report["cache"]["cached"] == len(before)
    assert _entries(tmp_path / "ray" / "cache") == before


def test_device_resource_is_checked_before_any_work(
    ray_instance: Any,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DAMO_RAY_ADDRESS", raising=False)
    with pytest.raises(DamoError, match="needs --ray"):
        optimize(MODEL, DATA, space=SPACE, output=tmp_path / "a", device_resource="npu-box")
    t0 = time.monotonic()
    with pytest.raises(DamoError, match=r"no node of the Ray cluster has .*npu-box") as err:
        optimize(
            MODEL, DATA, space=SPACE, output=tmp_path / "b", ray="local",
            device_resource="npu-box", log=lambda _: None,
        )  # fmt: skip
    assert "--resume" in (err.value.hint or "")
    assert time.monotonic() - t0 < 60  # refused before building anything
    assert not list((tmp_path / "b").glob("cache/*/entry.json"))
    with pytest.raises(DamoError, match="--workers -1"):
        optimize(MODEL, DATA, space=SPACE, output=tmp_path / "c", workers=-1)


@pytest.mark.slow
def test_optimize_driver_killed_on_ray_resumes_without_recomputing(
    head_node: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    """SIGKILL the driver of ``optimize --ray HOST:PORT`` once some candidates are evaluated;
    ``--resume`` (here, without Ray) reuses every entry the cluster finished."""
    space = tmp_path / "space.json"
    space.write_text(json.dumps(SPACE))
    out = tmp_path / "opt"
    args = ["optimize", MODEL, "--data", DATA, "--space", str(space), "-o", str(out)]
    env = {**head_node.env, "XDG_CACHE_HOME": str(tmp_path / "xdg"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "damo_plugins.cli", *args, "--ray", head_node.address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    seen: list[str] = []
    deadline = time.monotonic() + 600
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("  mAP ") or time.monotonic() > deadline:
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    text = "".join(seen)
    assert proc.returncode == -signal.SIGKILL and "  mAP " in text, text[-3000:]
    assert "Ray cluster at" in text
    before = _entries(out / "cache")
    assert before, "the killed run left no finished cache entry"

    resumed = subprocess.run(
        [sys.executable, "-m", "damo_plugins.cli", *args, "--resume", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, **env, "DAMO_RAY_ADDRESS": "none"},
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads(resumed.stdout)
    after = _entries(out / "cache")
    for key, stamp in before.items():  # nothing the cluster finished was redone
        assert after[key] == stamp
    assert report["cache"]["computed"] == len(after) - len(before)
    assert report["cache"]["cached"] >= len(before)
    assert len(report["rows"]) == 3 and report["best"] is not None
    _no_orphans(head_node)


def _no_orphans(node: Any) -> None:
    """The killed driver's tasks are gone from the cluster (Ray ends a dead driver's job)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        busy = []
        for p in node.processes():
            try:
                if p.cmdline() and p.cmdline()[0].startswith("ray::_ray_task"):
                    busy.append(p)
            except (psutil.Error, OSError):
                continue
        if not busy:
            return
        time.sleep(0.5)
    raise AssertionError("tasks of the killed driver still run on the cluster")
