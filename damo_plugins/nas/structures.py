"""Built-in structures (shipped as JSON in ``damo_plugins/assets``) and how to name them.

DAMO-YOLO's backbones, from tinyvision/DAMO-YOLO ``damo/base_models/backbones/nas_backbones``
(quantisation keys dropped): T = ``tinynas_L20_k1kx``, S = ``tinynas_L25_k1kx``,
M = ``tinynas_L35_kxkx``. ``nas_init`` is MAE-NAS's small starting point for DAMO-YOLO
searches (upstream ``configs/damoyolo``; image channels 3, the Focus supplies the 12).
"""

from __future__ import annotations

from pathlib import Path

from damo_plugins.core.errors import DamoError
from damo_plugins.models.structure import Structure, load_structure

ASSETS = Path(__file__).resolve().parent.parent / "assets"
ALIASES = {
    "t": "tinynas_L20_k1kx",
    "damo-yolo-t": "tinynas_L20_k1kx",
    "s": "tinynas_L25_k1kx",
    "damo-yolo-s": "tinynas_L25_k1kx",
    "m": "tinynas_L35_kxkx",
    "damo-yolo-m": "tinynas_L35_kxkx",
    "init": "nas_init",
}
BUILTIN = ("tinynas_L20_k1kx", "tinynas_L25_k1kx", "tinynas_L35_kxkx", "nas_init")


def builtin_path(name: str) -> Path | None:
    stem = ALIASES.get(name.lower(), name)
    if stem in BUILTIN:
        return ASSETS / f"{stem}.json"
    return None


def resolve_structure(spec: str | Path) -> Structure:
    """A file path (.json or DAMO-YOLO .txt) or a built-in name (t, s, m, damo-yolo-s, ...)."""
    p = Path(spec)
    if p.exists():
        return load_structure(p)
    builtin = builtin_path(str(spec))
    if builtin is not None:
        return load_structure(builtin)
    raise DamoError(
        f"structure not found: {spec}",
        f"give a .json/.txt file or a built-in name: {', '.join(sorted(ALIASES))}, {', '.join(BUILTIN)}",
    )
