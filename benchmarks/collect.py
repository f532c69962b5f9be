"""Assemble ``docs/benchmarks.md`` from the sections the benchmark scripts write.

Each script under ``benchmarks/`` writes its own section to ``docs/benchmarks/<name>.md``
(with the exact command that produced it); this script puts them in one page behind a
description of the machine. Run: ``python benchmarks/collect.py``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from common import DOCS, ROOT, SHARED_MACHINE, log, machine, write_section

from damo_plugins.lib.machine import summary

ORDER = [
    "compression",
    "deploy_rewrites",
    "adapters",
    "accuracy_control",
    "reparam",
    "training",
    "nas",
    "keypoints",
]


def machine_notes() -> str:
    """The machine as a list: description, what OpenVINO does by default here, the caveat."""
    info = machine()
    precision = info.get("ov_cpu_default_precision")
    lines = [f"- {summary(info)}"]
    if precision and precision != "f32":
        lines.append(
            f"- On this CPU OpenVINO's default CPU inference precision is **{precision}**; our "
            "OpenVINO adapter compiles in true **f32** unless asked otherwise, and every table "
            "says which precision its rows use."
        )
    lines.append(f"- {SHARED_MACHINE} Each section describes the machine it was measured on.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    parts = [
        "# Benchmarks\n",
        "Every section below was produced by a script in `benchmarks/`; its command and the "
        "machine it ran on are given in the section. The machines differ between sessions "
        "(AMD EPYC with AVX-512/VNNI/BF16, and without: AVX2 only), so compare ratios within "
        "a section, not milliseconds across sections. `python benchmarks/collect.py` rebuilds "
        "this page from `docs/benchmarks/*.md`.\n",
        "## The machine this page was assembled on\n",
        machine_notes() + "\n",
    ]
    names = [n for n in ORDER if (DOCS / f"{n}.md").exists()]
    names += sorted(p.stem for p in DOCS.glob("*.md") if p.stem not in ORDER)
    parts.append("Sections: " + ", ".join(f"[{n}](#{n})" for n in names) + "\n")
    for name in names:
        text = (DOCS / f"{name}.md").read_text()
        text = re.sub(r"\]\((?!https?:|/|benchmarks/)([^)]+\.png)\)", r"](benchmarks/\1)", text)
        parts.append(f'<a id="{name}"></a>\n\n' + text.strip() + "\n")
    out = write_section(args.output, "\n".join(parts))
    log(f"wrote {out} ({len(names)} sections)")


if __name__ == "__main__":
    main()
