"""Reading what a pickle *would* do, without doing it.

``torch.load(weights_only=True)`` refuses pickles that reference code, but its error text
depends on how the pickle was written ("Unsupported global: GLOBAL posix.system", "Unsupported
operand 149", "Trying to call reduce for unrecognized function ..."): matching its wording
misreported a malicious file as "truncated or corrupt". :func:`code_references` walks the
opcode stream with :mod:`pickletools` — which only decodes, never executes — and lists the
globals the pickle would import, so the refusal can always say "would run code" and name it.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from pathlib import Path

#: globals a plain tensor checkpoint legitimately references
SAFE_PREFIXES = (
    "torch.",
    "collections.OrderedDict",
    "numpy.core.multiarray._reconstruct",
    "numpy.dtype",
    "numpy.ndarray",
    "numpy._core.multiarray._reconstruct",
    "_codecs.encode",
    "builtins.set",
    "builtins.frozenset",
    "builtins.slice",
)

#: opcodes that push a string (candidates for STACK_GLOBAL's module and name)
_STRING_OPS = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
}


def _pickle_bytes(path: Path) -> bytes:
    """The pickle stream of a checkpoint: ``data.pkl`` of a zip checkpoint, or the file."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("data.pkl")]
            if names:
                return zf.read(names[0])
    return Path(path).read_bytes()


def referenced_globals(path: str | Path) -> list[str]:
    """``module.name`` of every global the pickle in ``path`` references (decoded, not run).

    Raises ``ValueError`` when the stream cannot be decoded (truncated or not a pickle).
    """
    data = _pickle_bytes(Path(path))
    found: list[str] = []
    strings: list[str] = []
    memo: dict[int, str] = {}
    for op, arg, _ in pickletools.genops(io.BytesIO(data)):
        if op.name == "GLOBAL" and isinstance(arg, str):
            found.append(arg.replace(" ", ".", 1))
        elif op.name in _STRING_OPS and isinstance(arg, (str, bytes)):
            strings.append(arg if isinstance(arg, str) else arg.decode("latin-1"))
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
            memo[int(arg)] = strings[-1]
        elif op.name in ("BINGET", "LONG_BINGET", "GET") and int(arg) in memo:
            strings.append(memo[int(arg)])
        elif op.name == "MEMOIZE" and strings:
            memo[len(memo)] = strings[-1]
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.append(f"{strings[-2]}.{strings[-1]}")
    return found


def code_references(path: str | Path) -> list[str]:
    """The referenced globals that a tensor checkpoint has no business importing."""
    return [g for g in referenced_globals(path) if not g.startswith(SAFE_PREFIXES)]
