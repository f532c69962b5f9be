"""Assemble ``docs/benchmarks.md`` from the sections the benchmark scripts write.

Each script under ``benchmarks/`` writes its own section to ``docs/benchmarks/<name>.md``
(with the exact command that produced it); this script puts them in one page behind a
description of the machine. Run: ``python benchmarks/collect.py``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ROOT / "docs" / "benchmarks"
ORDER = ["compression", "adapters", "accuracy_control", "reparam", "training", "nas", "keypoints"]


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        lscpu = ""
    model = re.search(r"Model name:\s*(.+)", lscpu)
    flags = set(re.search(r"Flags:\s*(.+)", lscpu).group(1).split()) if "Flags:" in lscpu else set()
    isa = [
        f
        for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
        if f in flags
    ]
    versions = []
    for dist in ("torch", "onnxruntime", "openvino", "nncf", "neural-compressor"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{dist} {metadata.version(dist)}")
    return (
        f"- CPU: {model.group(1).strip() if model else platform.processor()}, "
        f"{os.cpu_count()} logical cores; ISA: {', '.join(isa) or 'unknown'}\n"
        f"- Python {platform.python_version()}; {', '.join(versions)}\n"
        "- On this CPU (AVX512-BF16) OpenVINO's default CPU inference precision is **bf16**; "
        "our OpenVINO adapter compiles in true **f32** unless asked otherwise, and every table "
        "says which precision its rows use.\n"
        "- The machine is shared (2 vCPUs, other jobs running while most of these were measured): "
        "absolute milliseconds are noisy; the ratios, measured side by side in interleaved "
        "rounds, are the figures to quote."
    )


def main() -> None:
    parts = [
        "# Benchmarks\n",
        "Every section below was produced by a script in `benchmarks/` on the machine described "
        "here; its command is given in the section. `python benchmarks/collect.py` rebuilds this "
        "page from `docs/benchmarks/*.md`.\n",
        "## Machine\n",
        machine() + "\n",
    ]
    names = [n for n in ORDER if (SECTIONS / f"{n}.md").exists()]
    names += sorted(p.stem for p in SECTIONS.glob("*.md") if p.stem not in ORDER)
    parts.append("Sections: " + ", ".join(f"[{n}](#{n})" for n in names) + "\n")
    for name in names:
        text = (SECTIONS / f"{name}.md").read_text()
        text = re.sub(r"\]\((?!https?:|/|benchmarks/)([^)]+\.png)\)", r"](benchmarks/\1)", text)
        parts.append(f'<a id="{name}"></a>\n\n' + text.strip() + "\n")
    (ROOT / "docs" / "benchmarks.md").write_text("\n".join(parts))
    print(f"wrote docs/benchmarks.md ({len(names)} sections)")


if __name__ == "__main__":
    main()
