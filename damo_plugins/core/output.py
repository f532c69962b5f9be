"""The output folder: the tool owns only what it writes there.

A run's output folder may hold other things (a user's ``-o .``, notes, photos): the tool
must never delete or overwrite those. :class:`OutputFolder` makes that mechanical:

* **a manifest** (``.damo-outputs.json``) lists every entry the tool wrote — step folders,
  reports, plots — and every temporary folder *before* it is created, so a run killed with
  SIGKILL leaves nothing the next run cannot recognise as its own and remove;
* **an exclusive lock** (``fcntl.flock`` on ``.damo.lock``, holding the owner's pid) is held
  for the whole run: a second run into the same folder is refused naming the holder's pid.
  The kernel drops the lock when its process dies, so a stale lock never needs cleaning;
* ``--force`` removes exactly the manifest's entries of the previous run, nothing else;
* a folder that holds only the report of a failed or interrupted run (no step outputs) is
  reused without ``--force``, so a corrected command just works.

``fcntl`` rather than a lock library: the lock file carries the holder's pid for the error
message, and ``flock`` has exactly the dies-with-the-process semantics wanted here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from damo_plugins.core.errors import DamoError
from damo_plugins.core.io import _explain, _fix_mode, _fsync, ensure_dir, write_text

MANIFEST = ".damo-outputs.json"
LOCK = ".damo.lock"
#: names of the tool's bookkeeping files (never counted as contents)
BOOKKEEPING = (MANIFEST, LOCK)
#: what a failed run may leave besides its report: reusable without --force
REPORT_FILES = ("report.json", "report.md", "report.png")


class OutputFolder:
    """A locked output folder with a manifest of the tool's own entries.

    Use as a context manager around the whole run::

        with OutputFolder(out) as folder:
            folder.claim(force=force, inputs=[model_path])
            with folder.step_dir("01-export") as tmp:
                ...  # write into tmp; renamed to out/01-export on success
            folder.record("report.json")
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self.entries: list[str] = []
        self.pending: list[str] = []
        self.previous: dict[str, Any] = {}

    # ----------------------------------------------------------------- locking
    def __enter__(self) -> OutputFolder:
        if "\0" in str(self.path):
            raise DamoError(
                f"output path {str(self.path)!r} contains a NUL byte", "choose another -o"
            )
        if self.path.exists() and not self.path.is_dir():
            raise DamoError(f"output {self.path} exists and is not a folder", "choose another -o")
        ensure_dir(self.path)
        self._lock()
        try:
            self.previous = self._read_manifest()
            # until claim() replaces them, the previous run's entries stay recorded: a run
            # refused here must not make the tool forget what it owns
            self.entries = list(self.previous.get("entries", []))
            self._remove_leftovers(self.previous.get("pending", []))
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.pending = []
            self._save()
        self._unlock()

    def _lock(self) -> None:
        import fcntl

        lock = self.path / LOCK
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _explain(exc, lock) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DamoError(
                f"output folder {self.path} is in use by another run (pid {holder})",
                "wait for it to finish, or choose another -o",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def _unlock(self) -> None:
        if self._fd is not None:
            import fcntl

            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    # ---------------------------------------------------------------- manifest
    def _read_manifest(self) -> dict[str, Any]:
        path = self.path / MANIFEST
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {"unreadable": True}
        if not isinstance(data, dict):
            return {"unreadable": True}
        names = [n for n in data.get("entries", []) + data.get("pending", []) if _safe(n)]
        return {
            **data,
            "entries": [n for n in data.get("entries", []) if n in names],
            "pending": [n for n in data.get("pending", []) if n in names],
        }

    def _save(self) -> None:
        data = {"tool": "damo-plugins", "entries": self.entries, "pending": self.pending}
        write_text(self.path / MANIFEST, json.dumps(data, indent=1) + "\n")

    def record(self, name: str) -> None:
        """Note that the tool wrote ``name`` (a file or folder directly in the folder)."""
        if name not in self.entries:
            self.entries.append(name)
            self._save()

    # ------------------------------------------------------------------ claim
    def foreign(self) -> list[str]:
        """Entries the tool did not write (per the previous manifest)."""
        ours = set(self.previous.get("entries", [])) | set(BOOKKEEPING)
        return sorted(p.name for p in self.path.iterdir() if p.name not in ours)

    def claim(self, *, force: bool, inputs: Sequence[str | os.PathLike[str]] = ()) -> None:
        """Make the folder this run's: refuse foreign contents without ``force``, refuse a
        folder holding the run's own input, remove the previous run's outputs."""
        here = self.path.resolve()
        for item in inputs:
            src = Path(item).resolve()
            if src == here or here == src.parent or here in src.parents:
                raise DamoError(
                    f"output folder {self.path} holds the run's input {item}",
                    "choose another -o: the input is never written to or removed",
                )
        previous = list(self.previous.get("entries", []))
        foreign, ours = self.foreign(), [n for n in previous if (self.path / n).exists()]
        reusable = not foreign and set(ours) <= set(REPORT_FILES) and self._previous_failed()
        if (foreign or ours) and not force and not reusable:
            what = "files it did not write" if foreign else "the outputs of an earlier run"
            raise DamoError(
                f"output folder {self.path} already holds {what}",
                "use --force to replace the tool's earlier outputs (other files are kept), "
                "or choose another -o",
            )
        for name in ours:
            _remove(self.path / name)
        self.entries = []
        self._save()

    def _previous_failed(self) -> bool:
        try:
            status = json.loads((self.path / "report.json").read_text()).get("status")
        except (OSError, ValueError, AttributeError):
            return False
        return status in ("failed", "interrupted")

    # ------------------------------------------------------------- step folders
    @contextlib.contextmanager
    def _scratch(self, name: str) -> Iterator[Path]:
        """A fresh temporary folder for step ``name``, removed when the block ends.

        The temporary name is recorded before the folder exists, so whatever kills the
        run, the next run finds and removes it.
        """
        tmp = self.path / f".{name}.{os.getpid()}.tmp"
        self.pending.append(tmp.name)
        self._save()
        try:
            _remove(tmp)
            tmp.mkdir()
            yield tmp
        finally:
            _remove(tmp)
            self.pending.remove(tmp.name)

    @contextlib.contextmanager
    def step_dir(self, name: str) -> Iterator[Path]:
        """A temporary folder renamed to ``name`` when the block succeeds."""
        final = self.path / name
        with self._scratch(name) as tmp:
            try:
                yield tmp
                for f in tmp.rglob("*"):
                    if f.is_file():
                        _fsync(f)
                _fix_mode(tmp, directory=True)
                if final.exists():
                    if name not in self.entries:
                        raise DamoError(f"{final} already exists and was not written by this run")
                    _remove(final)
                os.replace(tmp, final)
            except OSError as exc:
                raise _explain(exc, final) from exc
            except DamoError as exc:
                # name the file the user will look for, not the temporary folder it was in
                exc.message = exc.message.replace(str(tmp), str(final))
                exc.args = (exc.message,)
                raise
        self.record(name)

    @contextlib.contextmanager
    def flat_dir(self, name: str) -> Iterator[Path]:
        """Like :meth:`step_dir`, but the block's files land in the folder itself.

        For single-step verbs (``-o DIR`` means the model is in ``DIR``). On success every
        entry is checked first (a name the tool did not write, or one of its bookkeeping and
        report files, is refused before anything moves), then each is recorded in the
        manifest *before* it is renamed into place, so a kill mid-move leaves only
        entries the next run knows as its own.
        """
        with self._scratch(name) as tmp:
            try:
                yield tmp
                children = sorted(tmp.iterdir())
                for child in children:
                    final = self.path / child.name
                    if child.name in (*BOOKKEEPING, *REPORT_FILES):
                        raise DamoError(
                            f"step '{name}' wrote '{child.name}', a name the tool keeps"
                        )
                    if final.exists() and child.name not in self.entries:
                        raise DamoError(f"{final} already exists and was not written by this run")
                for child in children:
                    for f in [child, *child.rglob("*")] if child.is_dir() else [child]:
                        if f.is_file():
                            _fsync(f)
                    self.record(child.name)
                    _remove(self.path / child.name)
                    os.replace(child, self.path / child.name)
            except OSError as exc:
                raise _explain(exc, self.path) from exc

    def _remove_leftovers(self, names: Sequence[str]) -> None:
        """Temporary folders a killed run recorded (and the report writer's temp files)."""
        for name in names:
            _remove(self.path / name)
        for entry in [*self.previous.get("entries", []), MANIFEST]:
            for tmp in self.path.glob(f".{entry}.*.tmp"):
                _remove(tmp)


def _safe(name: Any) -> bool:
    """A manifest entry names one child of the folder: never a path that leaves it."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..", *BOOKKEEPING)
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
    )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
