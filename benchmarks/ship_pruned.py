"""Ship the pruned, recovered demo model that ``damo-opt demo --full`` made.

    damo-opt demo --full -o runs/demo-full
    python benchmarks/ship_pruned.py runs/demo-full

Copies the ``prune`` step's checkpoint of ``RUN/pruned`` to
``damo_plugins/assets/damo-yolo-t50-synth-pruned.pt`` and writes its JSON: the prune step's
options and measured metrics (FLOPs and params actually removed, mAP before / right after /
recovered on the control images, recovery CPU time), the SHA-256 of the original it was
pruned from, the command, and the ``--full`` run's table (held-out mAP and latency per row).

Refuses a run that was not ``demo --full`` (another prune recipe, or a shipped checkpoint
reused) and a run of another original: ``damo-opt demo`` uses the checkpoint only while its
recorded parent is, byte for byte, the embedded model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from common import ROOT

from damo_plugins.demo import (
    EMBEDDED,
    PRUNED,
    RECOVERY,
    RECOVERY_DATA,
    embedded_checkpoint,
    sha256,
)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="the output folder of `damo-opt demo --full`")
    args = ap.parse_args(argv)
    run = Path(args.run)
    try:
        rep = json.loads((run / "report.json").read_text())
        chain = json.loads((run / "pruned" / "report.json").read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(
            f"{run}: not a finished demo folder ({exc}); run damo-opt demo --full"
        ) from None
    if "machine" not in rep:
        raise SystemExit(f"{run}: made by an older damo-opt demo; run damo-opt demo --full again")
    step = next((s for s in chain["steps"] if s["step"] == "prune"), None)
    if step is None or any(step["config"].get(k) != v for k, v in RECOVERY.items()):
        raise SystemExit(f"{run}: its pruned rows were not made by `damo-opt demo --full`")
    original = embedded_checkpoint(EMBEDDED)
    if original is None or Path(rep["model"]).resolve() != original.resolve():
        raise SystemExit(f"{run}: pruned from {rep['model']}, not the embedded {EMBEDDED}")
    target = ROOT / "damo_plugins" / "assets" / PRUNED
    shutil.copyfile(step["artifact"], target)
    keep = ("params", "flops", "size_bytes", "mAP", "latency_ms", "speedup", "runtime", "precision")
    info = {
        "file": PRUNED,
        "parent": EMBEDDED,
        "parent_sha256": sha256(original),
        "command": "damo-opt demo --full",
        "recipe": RECOVERY,
        "data": RECOVERY_DATA,
        "prune": rep["prune"],  # the prune step's scalar metrics, as the demo reports them
        "demo_full": {
            "data": rep["data"],
            "machine": rep["machine"],  # as the demo recorded it, right after its timing
            "rows": {r["name"]: {k: r.get(k) for k in keep} for r in rep["rows"]},
        },
    }
    target.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"shipped {target} ({target.stat().st_size / 1e6:.1f} MB) and its JSON")
    return 0


if __name__ == "__main__":
    sys.exit(main())
