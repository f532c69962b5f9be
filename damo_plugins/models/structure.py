"""Backbone *structures*: the data that describes a TinyNAS/MAE-NAS backbone.

A structure is a list of blocks, as in DAMO-YOLO's ``tinynas_*.txt`` files::

    [{'class': 'ConvKXBNRELU', 'in': 3, 'out': 32, 's': 1, 'k': 3},
     {'class': 'SuperResConvK1KX', 'in': 32, 'out': 128, 's': 2, 'k': 3, 'L': 1, 'btn': 24},
     ...]

It is read from JSON or from that Python-literal text with :func:`ast.literal_eval` — never
``eval`` — and validated: known block classes, required keys present, positive integer
channels, odd kernels, stride 1 or 2. Other keys upstream files carry (``nbitsA``,
``nbitsW``, ...) are kept and ignored.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from damo_plugins.core.errors import DamoError

STEM = "ConvKXBNRELU"
K1KX = "SuperResConvK1KX"
KXKX = "SuperResConvKXKX"
REQUIRED: dict[str, tuple[str, ...]] = {
    STEM: ("in", "out", "s", "k"),
    K1KX: ("in", "out", "s", "k", "L", "btn"),
    KXKX: ("in", "out", "s", "k", "L", "btn"),
}

Structure = list[dict[str, Any]]


def parse_structure(
    data: str | bytes | Sequence[Mapping[str, Any]], source: str = "<structure>"
) -> Structure:
    """Parse JSON or Python-literal text (or take a list) and validate it."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DamoError(f"{source}: structure is not UTF-8 text") from exc
    if isinstance(data, str):
        text = data.strip()
        if not text:
            raise DamoError(f"{source}: structure is empty")
        try:
            obj: Any = json.loads(text)
        except ValueError:
            try:
                obj = ast.literal_eval(text)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
                raise DamoError(
                    f"{source}: structure is neither JSON nor a Python literal list of dicts "
                    f"({type(exc).__name__})",
                    "write it as [{'class': 'ConvKXBNRELU', 'in': 3, ...}, ...]",
                ) from None
    else:
        obj = data
    return validate_structure(obj, source)


def load_structure(path: str | Path) -> Structure:
    """Read a structure file (``.json`` or DAMO-YOLO's ``.txt`` literal format)."""
    from damo_plugins.core.io import check_input_file

    p = check_input_file(path, "structure")
    return parse_structure(p.read_bytes(), str(p))


def validate_structure(obj: Any, source: str = "<structure>") -> Structure:
    if isinstance(obj, Mapping) and "structure" in obj:
        obj = obj["structure"]
    if not isinstance(obj, (list, tuple)) or not obj:
        raise DamoError(f"{source}: a structure is a non-empty list of blocks")
    out: Structure = []
    for i, block in enumerate(obj):
        where = f"{source}: block {i}"
        if not isinstance(block, Mapping):
            raise DamoError(f"{where}: expected a dict, got {type(block).__name__}")
        cls = block.get("class")
        if cls not in REQUIRED:
            raise DamoError(f"{where}: unknown class {cls!r}", f"one of {', '.join(REQUIRED)}")
        if i == 0 and cls != STEM:
            raise DamoError(f"{where}: the first block must be the {STEM} stem")
        if i > 0 and cls == STEM:
            raise DamoError(f"{where}: only the first block may be a {STEM} stem")
        missing = [k for k in REQUIRED[cls] if k not in block]
        if missing:
            raise DamoError(f"{where} ({cls}): missing key(s) {', '.join(missing)}")
        clean = dict(block)
        for key in REQUIRED[cls]:
            v = block[key]
            if isinstance(v, bool) or not isinstance(v, int):
                raise DamoError(f"{where} ({cls}): '{key}' must be an integer, got {v!r}")
            if v <= 0:
                raise DamoError(f"{where} ({cls}): '{key}' must be positive, got {v}")
        if clean["k"] % 2 == 0:
            raise DamoError(f"{where} ({cls}): kernel 'k' must be odd, got {clean['k']}")
        if clean["s"] not in (1, 2):
            raise DamoError(f"{where} ({cls}): stride 's' must be 1 or 2, got {clean['s']}")
        if out and clean["in"] != out[-1]["out"]:
            raise DamoError(
                f"{where} ({cls}): 'in' is {clean['in']} but the previous block outputs {out[-1]['out']}"
            )
        out.append(clean)
    return out


def dumps_json(structure: Structure) -> str:
    return json.dumps(structure, indent=1) + "\n"


def dumps_text(structure: Structure) -> str:
    """DAMO-YOLO's literal text form (readable by upstream tools too)."""
    return "[" + ",\n ".join(repr(dict(b)) for b in structure) + "]\n"


def describe_structure(structure: Structure) -> str:
    """One line per structure, for messages: ``stem 3->24 k3 | K1KX 24->64 s2 k3 L2 btn24 | ...``.

    Used when a structure was *read back* from a checkpoint's weights, so that the log and
    errors show what was recognised in the words of the structure files.
    """
    parts = []
    for b in structure:
        if b["class"] == STEM:
            parts.append(f"stem {b['in']}->{b['out']} k{b['k']}")
        else:
            kind = "K1KX" if b["class"] == K1KX else "KXKX"
            parts.append(
                f"{kind} {b['in']}->{b['out']} s{b['s']} k{b['k']} L{b['L']} btn{b['btn']}"
            )
    return " | ".join(parts)
