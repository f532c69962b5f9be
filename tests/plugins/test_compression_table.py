"""The compression-table benchmark end to end, on a reduced setting.

A random quarter-width DAMO-YOLO-T at 128 px goes through every row of the table — reparam,
prune, NNCF / ONNX Runtime INT8, real OpenVINO / ONNX Runtime / PyTorch timings and
pycocotools mAP on a few held-out synthetic images — and every row must come out with numbers
(the values themselves are meaningless for random weights; the trained run is in
``docs/benchmarks/compression.md``).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from damo_plugins.core.artifact import load_model
from damo_plugins.core.errors import DamoError

REPO = Path(__file__).resolve().parents[2]
ROWS = [
    "original",
    "fused",
    "pruned",
    "int8",
    "pruned_int8",
    "pruned_int8_ort",
]


def _script() -> Any:
    spec = importlib.util.spec_from_file_location(
        "compression_table", REPO / "benchmarks" / "compression_table.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("compression")
    with pytest.MonkeyPatch.context() as mp:  # synthetic data generated here, not in ~/.cache
        mp.setenv("XDG_CACHE_HOME", str(tmp / "xdg"))
        yield _run(tmp)


def _run(tmp: Path) -> dict[str, Any]:
    # A checkpoint file, as a user passes one.
    art = load_model(
        "damo-yolo-t", input_shape=[1, 3, 128, 128], model_args={"width": 0.25, "num_classes": 6}
    )
    ckpt = art.save(tmp / "ckpt", stem="t")
    return _script().main(
        [
            "--checkpoint",
            str(ckpt),
            "--val-images",
            "4",
            "--calib",
            "4",
            "--finetune-epochs",
            "0",
            "--rounds",
            "1",
            # INC's PT2E path costs ~2 min of this CI per model (two torch.export runs); its
            # quantization is tested in tests/adapters/test_inc_adapter.py, its table row in
            # the benchmark run (docs/benchmarks/compression.md)
            "--quantizers",
            "nncf,onnxruntime",
            "--slot-seconds",
            "0.01",
            "--work",
            str(tmp / "work"),
            "--doc",
            str(tmp / "doc" / "compression.md"),
        ]
    )


@pytest.mark.slow
def test_every_row_has_numbers(result: dict[str, Any]) -> None:
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == ROWS
    for key, row in rows.items():
        for column in ("params", "flops", "size_bytes", "mAP", "mAP50", "speedup_ov_f32"):
            assert _number(row[column]), (key, column, row[column])
        assert 0.0 <= row["mAP"] <= 1.0
        latency = row["latency_ms"]
        for runtime in ("ov_f32", "ov_default"):
            assert _number(latency[runtime]) and latency[runtime] > 0, (key, runtime)
        if key in ("original", "fused", "pruned"):
            assert _number(latency["torch"]), key  # PyTorch eager for the FP32 rows
    assert _number(rows["pruned_int8_ort"]["latency_ms"]["ort"])  # its own runtime too
    # pruning shrinks the model; INT8 shrinks the file
    assert rows["pruned"]["params"] < rows["fused"]["params"] < rows["original"]["params"]
    assert rows["pruned_int8"]["size_bytes"] < rows["pruned"]["size_bytes"]
    assert rows["original"]["speedup_ov_f32"] == pytest.approx(1.0)
    # a thin caller of optimize: its rows (and their held-out mAP) are optimize's
    import json

    made = json.loads(Path(result["optimize"]).read_text())["rows"]
    assert {r["mAP"] for r in rows.values()} <= {r["mAP"] for r in made}
    assert {r["params"] for r in rows.values()} <= {r["params"] for r in made}


@pytest.mark.slow
def test_writes_the_section_and_plot(result: dict[str, Any]) -> None:
    doc = Path(result["doc"]).read_text()
    assert f"<!-- section: {result['key']} -->" in doc
    assert "pruned + INT8 (ONNX Runtime QDQ)" in doc and "Goals (issue 7)" in doc
    assert Path(result["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in result["rows"]:
        assert row["label"] in result["markdown"]


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DamoError, match="file not found"):
        _script().main(["--checkpoint", str(tmp_path / "nope.pt"), "--work", str(tmp_path)])
