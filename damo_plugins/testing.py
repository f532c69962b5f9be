"""Helpers for testing a plugin the way users will meet it: installed, discovered, run.

A plugin is only ever loaded through an entry point of an *installed* distribution, so the
honest test of a plugin installs one. These helpers write a real distribution to disk (the
modules plus a ``.dist-info`` folder with ``METADATA`` and ``entry_points.txt``) and put it
on ``sys.path`` and ``PYTHONPATH``: ``importlib.metadata`` finds it exactly as it finds a
pip-installed one, in this process and in ``damo-opt`` subprocesses alike. Nothing is
mocked, and nothing is left behind after the ``with`` block.

Typical use, in a plugin's own test suite::

    from damo_plugins.testing import assert_clean_error, installed, run_cli

    def test_my_pass_in_a_recipe(tmp_path):
        with installed("my-dist", {"my_plugin": SOURCE}, {"mine": "my_plugin"}):
            recipe = tmp_path / "r.yaml"
            recipe.write_text("model: tiny-cnn\\nsteps: [mine]\\n")
            proc = run_cli("run", recipe, "-o", tmp_path / "out")
            assert proc.returncode == 0, proc.stderr

To test an already installed plugin (``pip install -e .``), skip :func:`installed` and call
:func:`run_cli` or :func:`fresh_manager` directly.

This module imports neither pytest nor any heavy library, so it can be imported anywhere.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from damo_plugins.core.manager import GROUP, PluginManager, get_manager, reset_manager

__all__ = [
    "assert_clean_error",
    "fresh_manager",
    "installed",
    "make_distribution",
    "run_cli",
]

#: the command-line program name every error line starts with
PROG = "damo-opt"


def _normalized(name: str) -> str:
    """Distribution name as it appears in a ``.dist-info`` folder name (PEP 503/427 style)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _check_names(name: str, modules: Mapping[str, str], entry_points: Mapping[str, str]) -> None:
    """Reject what would produce a distribution pip could never install.

    A malformed fake would make the test fail somewhere far from the typo (or, worse, pass
    because the plugin silently never loads), so the mistake is named here.
    """
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?", name):
        raise ValueError(f"'{name}' is not a valid distribution name")
    for mod in modules:
        if not mod or not all(part.isidentifier() for part in mod.split(".")):
            raise ValueError(f"module name '{mod}' is not a dotted Python identifier")
    for ep, target in entry_points.items():
        if not ep or re.search(r"[\s=\[\]]", ep):
            raise ValueError(
                f"entry-point name '{ep}' must be non-empty, without spaces, '=' or []"
            )
        if not target or "\n" in target:
            raise ValueError(f"entry point '{ep}' needs a target like 'my_module'")


def make_distribution(
    root: str | os.PathLike[str],
    name: str,
    modules: Mapping[str, str],
    entry_points: Mapping[str, str],
    *,
    version: str = "0.0.1",
) -> Path:
    """Write an installed distribution ``name`` into the folder ``root`` and return ``root``.

    ``root`` plays the part of a ``site-packages`` folder: put it on ``sys.path`` (or use
    :func:`installed`, which does) and the distribution is installed. Several distributions
    may share one ``root``.

    ``modules`` maps a module name to its source (dedented, so triple-quoted strings can be
    indented like the test). A dotted name such as ``"pkg.sub"`` writes ``pkg/sub.py`` and
    makes ``pkg`` a package (``"pkg"`` itself may be given for ``pkg/__init__.py``).

    ``entry_points`` maps plugin names to targets in the ``damo_plugins`` group, e.g.
    ``{"shout": "shout_plugin"}``: the plugin name is what ``DAMO_PLUGINS_DISABLE`` and
    warnings use. A target need not exist (to test how a broken plugin is reported).

    Raises :class:`ValueError` for invalid names, a second distribution of the same name in
    ``root``, or a module file that already exists there.
    """
    root = Path(root)
    _check_names(name, modules, entry_points)
    root.mkdir(parents=True, exist_ok=True)
    norm = _normalized(name)
    if any(root.glob(f"{norm}-*.dist-info")):
        raise ValueError(f"a distribution '{name}' already exists in {root}")
    files: dict[Path, str] = {}
    for mod, source in modules.items():
        parts = mod.split(".")
        is_package = any(other.startswith(mod + ".") for other in modules)
        path = (
            root.joinpath(*parts, "__init__.py")
            if is_package
            else root.joinpath(*parts[:-1], parts[-1] + ".py")
        )
        files[path] = textwrap.dedent(source)
        for i in range(1, len(parts)):  # parent packages nobody gave a source for
            files.setdefault(root.joinpath(*parts[:i], "__init__.py"), "")
    for path in files:
        if path.exists() and path.name != "__init__.py":
            raise ValueError(f"{path} already exists (another distribution in {root}?)")
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not (path.exists() and text == ""):
            path.write_text(text)
    info = root / f"{norm}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "".join(f"{ep} = {target}\n" for ep, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n{lines}")
    (info / "INSTALLER").write_text("damo_plugins.testing\n")
    importlib.invalidate_caches()
    return root


def _forget_modules(names: Iterable[str] = (), under: Path | None = None) -> None:
    """Drop modules from ``sys.modules`` so the next import reads the files on disk.

    Without this, a second test installing a module of the same name with other source would
    silently get the first test's module back from the import cache.
    """
    tops = {n.split(".")[0] for n in names}
    for mod_name, module in list(sys.modules.items()):
        if mod_name.split(".")[0] in tops:
            del sys.modules[mod_name]
            continue
        if under is not None:
            file = getattr(module, "__file__", None)
            if file and Path(file).resolve().is_relative_to(under):
                del sys.modules[mod_name]


@contextmanager
def installed(
    name: str,
    modules: Mapping[str, str],
    entry_points: Mapping[str, str],
    *,
    version: str = "0.0.1",
    root: str | os.PathLike[str] | None = None,
) -> Iterator[Path]:
    """Install a distribution (see :func:`make_distribution`) for the ``with`` block.

    Inside the block the plugin is visible to this process (``sys.path``, and a fresh
    process-wide plugin manager) and to subprocesses such as :func:`run_cli` (``PYTHONPATH``).
    On exit ``sys.path``, ``PYTHONPATH``, the imported plugin modules and the process-wide
    manager are restored, and a temporary ``root`` is deleted. Yields the folder on
    ``sys.path``. Blocks may nest.
    """
    with tempfile.TemporaryDirectory(prefix="damo-plugin-") as tmp:
        where = Path(root) if root is not None else Path(tmp) / "site"
        make_distribution(where, name, modules, entry_points, version=version)
        entry = str(where)
        old_pythonpath = os.environ.get("PYTHONPATH")
        _forget_modules(modules)
        sys.path.insert(0, entry)
        os.environ["PYTHONPATH"] = entry + (os.pathsep + old_pythonpath if old_pythonpath else "")
        importlib.invalidate_caches()
        reset_manager()
        try:
            yield where
        finally:
            if entry in sys.path:
                sys.path.remove(entry)
            if old_pythonpath is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = old_pythonpath
            _forget_modules(under=where.resolve())
            importlib.invalidate_caches()
            reset_manager()


def fresh_manager(
    *, disable: Iterable[str] | None = None, load_only: Iterable[str] | None = None
) -> PluginManager:
    """A plugin manager that reads the installed entry points again.

    The process-wide manager (:func:`damo_plugins.get_manager`) reads entry points once;
    after installing a plugin it must be rebuilt to see it. Without arguments this resets
    it and returns the new process-wide manager, so code that uses the default manager
    (``damo_plugins.run``, ``load_model``) sees the same plugins. With ``disable`` or
    ``load_only`` (plugin names, like ``DAMO_PLUGINS_DISABLE`` and ``DAMO_PLUGINS_LOAD``) it
    returns a separate manager; pass that one explicitly (``manager=``).
    """
    reset_manager()
    importlib.invalidate_caches()
    if disable is None and load_only is None:
        return get_manager()
    return PluginManager(disable=disable, load_only=load_only)


def run_cli(
    *args: str | os.PathLike[str],
    env: Mapping[str, str | None] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run ``damo-opt ARGS`` in a subprocess, as a user would, and return the finished process.

    A subprocess is the honest test of a verb: it loads plugins from scratch, prints what a
    user sees and exits with the real status. ``env`` adds variables to this process's
    environment (``None`` removes one), e.g. ``{"DAMO_PLUGINS_DISABLE": "mine"}``. Output is
    text in ``.stdout``/``.stderr``; ``timeout`` (seconds) turns a hang into
    :class:`subprocess.TimeoutExpired`.
    """
    full_env = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    return subprocess.run(
        [sys.executable, "-m", "damo_plugins.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


def assert_clean_error(
    proc: subprocess.CompletedProcess[str], *needles: str, code: int = 2
) -> None:
    """Check that ``damo-opt`` failed the way a user-fixable problem must fail.

    That is: exit status ``code`` (2 for bad input, 3 for a failed verification), no
    traceback, exactly one ``damo-opt: error: ...`` line on stderr, and every ``needle``
    in that line (case-insensitive). Raises :class:`AssertionError` saying which rule broke,
    with the process's output; plain ``raise`` rather than ``assert`` so it works under
    ``python -O`` and outside pytest.
    """
    output = (
        f"\n--- exit status {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )
    if proc.returncode != code:
        raise AssertionError(f"expected exit status {code}, got {proc.returncode}{output}")
    if "Traceback" in proc.stderr:
        raise AssertionError(f"a traceback reached the user{output}")
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"{PROG}: error:")]
    if len(errors) != 1:
        raise AssertionError(f"expected one '{PROG}: error:' line, found {len(errors)}{output}")
    missing = [n for n in needles if n.lower() not in errors[0].lower()]
    if missing:
        raise AssertionError(f"the error line does not mention {missing}: {errors[0]}")
