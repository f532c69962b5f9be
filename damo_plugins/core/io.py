"""Atomic file output: a reader never sees a half-written file under its final name.

Everything damo-plugins writes goes to a temporary name in the destination folder and is
renamed into place with :func:`os.replace` once complete (a rename within one file system
is atomic on POSIX). If writing fails, for instance because the disk is full, the temporary
file is removed and whatever was under the final name before is left untouched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from damo_plugins.core.errors import DamoError


def _explain(exc: OSError, path: Path) -> DamoError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return DamoError(
            f"no space left while writing {path}", "free disk space or choose -o elsewhere"
        )
    blocker = next((q for q in [path, *path.parents] if q.exists() and not q.is_dir()), None)
    if blocker is not None and blocker != path:
        return DamoError(
            f"cannot write {path}: {blocker} is a file, not a folder", "choose another output path"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return DamoError(f"cannot write {path}: permission denied", "choose a writable output path")
    return DamoError(f"cannot write {path}: {exc.strerror or exc}", "check the output path")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success rename it to ``final``.

    ``suffix`` keeps a file extension on the temporary name for writers that look at it.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{final.name}.", suffix=suffix + ".tmp", dir=final.parent
        )
        os.close(fd)
    except OSError as exc:
        raise _explain(exc, final) from exc
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync(tmp_path)
        _fix_mode(tmp_path)
        os.replace(tmp_path, final)
    except OSError as exc:
        _remove(tmp_path)
        raise _explain(exc, final) from exc
    except BaseException:
        _remove(tmp_path)
        raise


def explain_write_failure(exc: BaseException, path: Path) -> DamoError:
    """One clear line for a writer that failed below Python (torch.save, OpenVINO).

    Native writers report a full disk in their own words (torch: "unexpected pos", OpenVINO:
    "basic_ios::clear: iostream error"). The OSError behind them, when Python saw one, is
    explained as usual; otherwise a nearly full disk or a file-size limit is the likely cause
    and is named, and anything else keeps the writer's own first line.
    """
    e: BaseException | None = exc
    while e is not None:
        if isinstance(e, OSError):
            return _explain(e, path)
        e = e.__cause__ or e.__context__
    import resource

    parent = next((q for q in path.parents if q.is_dir()), Path("."))
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        free = None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if (free is not None and free < 64 << 20) or soft != resource.RLIM_INFINITY:
        limit = f" (file-size limit {soft} bytes)" if soft != resource.RLIM_INFINITY else ""
        return DamoError(
            f"no space left while writing {path}{limit}", "free disk space or choose -o elsewhere"
        )
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DamoError(
        f"could not write {path}: {first[:200]}",
        "check free disk space and that the output folder is writable",
    )


def ensure_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and parents) or raise a clear error."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _explain(exc, p) from exc
    return p


def write_bytes(final: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)
    return Path(final)


def write_text(final: str | os.PathLike[str], text: str) -> Path:
    return write_bytes(final, text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fix_mode(path: Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the usual mode."""
    with contextlib.suppress(OSError):
        os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def check_regular(path: str | os.PathLike[str], what: str = "file") -> Path:
    """Refuse anything but a regular file *before* opening it.

    Opening a FIFO blocks until a writer appears (forever, for a user's stray pipe); a
    device or socket never ends. ``stat`` does not open, so this check cannot hang.
    """
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise DamoError(f"{what} not found: {p}", "check the path") from None
    except OSError as exc:
        raise DamoError(f"cannot access {what} {p}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise DamoError(f"{what} path is a directory, not a file: {p}", "give the file inside it")
    if not stat.S_ISREG(mode):
        kind = (
            "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        )
        raise DamoError(f"{what} {p} is {kind}, not a regular file", "give a regular file")
    return p


def check_input_file(path: str | os.PathLike[str], what: str = "model") -> Path:
    """Return ``path`` if it is a readable, non-empty regular file; otherwise a clear error."""
    p = Path(path)
    if not p.exists():
        raise DamoError(f"{what} file not found: {p}", "check the path")
    if p.is_dir():
        raise DamoError(f"{what} path is a directory, not a file: {p}", "give the file inside it")
    check_regular(p, f"{what} file")
    if p.stat().st_size == 0:
        raise DamoError(f"{what} file is empty: {p}", "re-create or re-download it")
    if not os.access(p, os.R_OK):
        raise DamoError(f"{what} file is not readable: {p}", "check its permissions")
    return p
