"""Plugin discovery and the registry of what plugins contribute.

Plugins are found **only** through installed entry points in the ``damo_plugins`` group (the
built-ins too, declared in this project's ``setup.cfg``), never by importing paths named in a
recipe. Each contribution hook is called plugin by plugin, so that

* a plugin that fails to import, has a misspelled hook, raises in a hook, or returns the
  wrong type is reported with a :class:`PluginWarning` naming the plugin and its
  distribution, and every other plugin keeps working;
* a name contributed by two plugins is reported naming both, and using that name is an error
  until one of them is disabled (``DAMO_PLUGINS_DISABLE``).

Environment variables:

``DAMO_PLUGINS_DISABLE=a,b``  do not load the plugins (entry-point names) ``a`` and ``b``.
``DAMO_PLUGINS_LOAD=a,b``     load only these plugins.
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy

from damo_plugins.core import hookspecs
from damo_plugins.core.errors import DamoError, PluginError

GROUP = "damo_plugins"

#: contribution hook -> kind shown by ``damo-opt plugins``
KINDS = {
    "damo_passes": "pass",
    "damo_adapters": "adapter",
    "damo_models": "model",
    "damo_calibration_sources": "calibration",
}


class PluginWarning(UserWarning):
    """A plugin could not be loaded or misbehaved; the others keep working."""


@dataclass(frozen=True)
class PluginInfo:
    """Where a plugin comes from."""

    name: str
    distribution: str
    version: str
    entry_point: str

    def label(self) -> str:
        return f"plugin '{self.name}' (distribution {self.distribution} {self.version})"


@dataclass
class Contribution:
    name: str
    kind: str
    obj: Any
    plugin: PluginInfo


@dataclass
class _Registry:
    items: dict[str, dict[str, Contribution]] = field(default_factory=dict)
    clashes: dict[tuple[str, str], list[PluginInfo]] = field(default_factory=dict)


def _split_env(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None or not raw.strip():
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


class PluginManager:
    """Loads plugins and answers "which pass / adapter / model is called X?"."""

    def __init__(
        self,
        *,
        load_entry_points: bool = True,
        disable: Iterable[str] | None = None,
        load_only: Iterable[str] | None = None,
    ) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}
        self.failures: dict[str, str] = {}
        env_disable = _split_env("DAMO_PLUGINS_DISABLE") or set()
        self.disabled = set(disable or ()) | env_disable
        only = _split_env("DAMO_PLUGINS_LOAD")
        self.load_only = set(load_only) if load_only is not None else only
        self._registry: _Registry | None = None
        if load_entry_points:
            self.load_entry_points()

    # ----------------------------------------------------------------- loading
    def load_entry_points(self) -> None:
        """Import and register every allowed plugin of the ``damo_plugins`` group."""
        eps = sorted(md.entry_points(group=GROUP), key=lambda e: e.name)
        installed = {ep.name for ep in eps}
        for var, names in (
            ("DAMO_PLUGINS_DISABLE", self.disabled),
            ("DAMO_PLUGINS_LOAD", self.load_only),
        ):
            for name in sorted(set(names or ()) - installed):
                warnings.warn(
                    f"{var} names '{name}', which is not an installed plugin "
                    f"({suggest(name, installed)})",
                    PluginWarning,
                    stacklevel=2,
                )
        for ep in eps:
            if ep.name in self.info or ep.name in self.failures:
                continue
            if ep.name in self.disabled:
                continue
            if self.load_only is not None and ep.name not in self.load_only:
                continue
            dist = getattr(ep, "dist", None)
            info = PluginInfo(
                name=ep.name,
                distribution=dist.metadata["Name"] if dist is not None else "?",
                version=dist.version if dist is not None else "?",
                entry_point=f"{ep.name} = {ep.value}",
            )
            try:
                module = ep.load()
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # a broken plugin (even one calling sys.exit) is isolated
                self._fail(info, f"failed to import: {type(exc).__name__}: {exc}")
                continue
            self.register(module, info)

    def register(self, plugin: Any, info: PluginInfo | str) -> None:
        """Register a plugin object (module or instance). Used for entry points and tests."""
        if isinstance(info, str):
            info = PluginInfo(info, "<registered in code>", "-", "-")
        if info.name in self.disabled:
            return
        try:
            self.pm.register(plugin, name=info.name)
        except Exception as exc:
            self._fail(info, f"could not be registered: {exc}")
            return
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=info.name)
            self._fail(info, f"implements an unknown hook (misspelled?): {exc}")
            return
        self.info[info.name] = info
        self._registry = None

    def _fail(self, info: PluginInfo, why: str) -> None:
        self.failures[info.name] = why
        warnings.warn(
            f"{info.label()} {why}; it is skipped "
            f"(set DAMO_PLUGINS_DISABLE={info.name} to silence this)",
            PluginWarning,
            stacklevel=3,
        )

    # ---------------------------------------------------------------- registry
    def _collect(self) -> _Registry:
        if self._registry is not None:
            return self._registry
        reg = _Registry(items={kind: {} for kind in KINDS.values()})
        for hook_name, kind in KINDS.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                info = self.info.get(impl.plugin_name) or PluginInfo(
                    impl.plugin_name, "?", "?", "?"
                )
                try:
                    result = impl.function()
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:
                    warnings.warn(
                        f"{info.label()} raised in {hook_name}: {type(exc).__name__}: {exc}; "
                        "its contributions are skipped",
                        PluginWarning,
                        stacklevel=2,
                    )
                    continue
                for name, obj in self._items(kind, result, info, hook_name):
                    self._add(reg, kind, name, obj, info)
        self._registry = reg
        return reg

    @staticmethod
    def _items(kind: str, result: Any, info: PluginInfo, hook: str) -> list[tuple[str, Any]]:
        """Validate one hook result; wrong types are reported and skipped."""
        from damo_plugins.core.adapter import Adapter
        from damo_plugins.core.passes import Pass

        def bad(what: str) -> list[tuple[str, Any]]:
            warnings.warn(
                f"{info.label()} returned {what} from {hook}; it is skipped",
                PluginWarning,
                stacklevel=4,
            )
            return []

        if result is None:
            return []
        out: list[tuple[str, Any]] = []
        if kind in ("model", "calibration"):
            if not isinstance(result, Mapping):
                return bad(f"a {type(result).__name__} instead of a mapping name -> callable")
            for name, fn in result.items():
                if not valid_name(name) or not callable(fn):
                    bad(f"an entry {name!r} that is not name -> callable (names: {NAME_RULE})")
                    continue
                out.append((name, fn))
            return out
        if not isinstance(result, (list, tuple)):
            return bad(f"a {type(result).__name__} instead of a list")
        for obj in result:
            if (kind == "pass" and isinstance(obj, type) and issubclass(obj, Pass)) or (
                kind == "adapter" and isinstance(obj, Adapter)
            ):
                name = getattr(obj, "name", None)
                if not valid_name(name):
                    bad(f"{obj!r} with an invalid name {name!r} (want {NAME_RULE})")
                    continue
                out.append((name, obj))
            else:
                bad(f"{obj!r}, which is not a {'Pass subclass' if kind == 'pass' else 'Adapter'}")
        return out

    @staticmethod
    def _add(reg: _Registry, kind: str, name: str, obj: Any, info: PluginInfo) -> None:
        table = reg.items[kind]
        key = (kind, name)
        if key in reg.clashes:
            reg.clashes[key].append(info)
            return
        if name in table:
            first = table.pop(name).plugin
            reg.clashes[key] = [first, info]
            warnings.warn(
                f"{kind} '{name}' is provided by both {first.label()} and {info.label()}; "
                f"'{name}' cannot be used until one is disabled "
                f"(DAMO_PLUGINS_DISABLE={info.name})",
                PluginWarning,
                stacklevel=3,
            )
            return
        table[name] = Contribution(name, kind, obj, info)

    def contributions(self, kind: str | None = None) -> list[Contribution]:
        reg = self._collect()
        kinds = [kind] if kind else list(reg.items)
        return [c for k in kinds for c in sorted(reg.items[k].values(), key=lambda c: c.name)]

    def get(self, kind: str, name: str) -> Contribution:
        """Return the contribution ``name`` of ``kind`` or raise a clear error."""
        reg = self._collect()
        if (kind, name) in reg.clashes:
            raise PluginError(clash_message(kind, name, reg.clashes[(kind, name)]))
        table = reg.items[kind]
        if name not in table:
            raise DamoError(f"unknown {kind} '{name}'", suggest(name, table))
        return table[name]

    def names(self, kind: str) -> list[str]:
        return sorted(self._collect().items[kind])

    def clash(self, kind: str, name: str) -> str | None:
        """The error text if ``name`` is provided by two plugins, else ``None``."""
        owners = self._collect().clashes.get((kind, name))
        return clash_message(kind, name, owners) if owners else None

    # -------------------------------------------------------------- shortcuts
    def get_pass(self, name: str) -> Any:
        return self.get("pass", name).obj

    def get_adapter(self, name: str) -> Any:
        return self.get("adapter", name).obj

    def get_model_builder(self, name: str) -> Callable[..., Any]:
        return self.get("model", name).obj

    def get_calibration_source(self, name: str) -> Callable[..., Any]:
        return self.get("calibration", name).obj

    def adapter_for_format(self, fmt: str) -> Any:
        """The first adapter that can read and write files of ``fmt`` (e.g. ``openvino``)."""
        for c in self.contributions("adapter"):
            if fmt in getattr(c.obj, "formats", ()):
                return c.obj
        raise DamoError(
            f"no installed adapter handles the '{fmt}' format",
            f"install damo-plugins-{fmt} (pip install -e adapters/{fmt})",
        )

    # ------------------------------------------------------------------ events
    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call an event hook on every plugin; a failing listener is reported, not fatal.

        Any exception is isolated, ``SystemExit`` included (a listener calling ``sys.exit``
        must not end the user's run). Only ``KeyboardInterrupt`` (Ctrl-C, and SIGTERM during
        a pipeline) goes through: it is the user stopping the run, not the listener failing.
        """
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            info = self.info.get(impl.plugin_name)
            label = info.label() if info else f"plugin '{impl.plugin_name}'"
            try:
                impl.function(**{a: kwargs[a] for a in impl.argnames})
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                warnings.warn(
                    f"{label} raised in {hook_name}: {type(exc).__name__}: {exc}",
                    PluginWarning,
                    stacklevel=2,
                )

    def add_cli(self, subparsers: Any) -> None:
        for impl in self.pm.hook.damo_cli.get_hookimpls():
            info = self.info.get(impl.plugin_name)
            label = info.label() if info else f"plugin '{impl.plugin_name}'"
            try:
                impl.function(subparsers=subparsers)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                warnings.warn(
                    f"{label} raised in damo_cli: {type(exc).__name__}: {exc}",
                    PluginWarning,
                    stacklevel=2,
                )


#: what a contributed name may look like (it is typed on command lines and in recipes)
NAME_RULE = "a string of letters, digits, '-', '_' or '.', starting with a letter or digit"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def valid_name(name: Any) -> bool:
    return isinstance(name, str) and bool(_NAME.match(name))


def clash_message(kind: str, name: str, owners: Iterable[PluginInfo]) -> str:
    """ "step 'export' is provided by two plugins: a (dist-a 1.0) and b (dist-b 2.0); ..."."""
    owners = list(owners)
    who = " and ".join(f"{p.name} ({p.distribution} {p.version})" for p in owners)
    label = "step" if kind == "pass" else kind
    return (
        f"{label} '{name}' is provided by {len(owners)} plugins: {who}; disable one with "
        f"DAMO_PLUGINS_DISABLE={owners[-1].name}"
    )


def suggest(name: str, choices: Iterable[str]) -> str:
    """'did you mean ...?' text for an unknown name."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    if choices:
        return "known: " + ", ".join(choices)
    return "none is installed"


_MANAGER: PluginManager | None = None


def get_manager() -> PluginManager:
    """The process-wide manager, created on first use."""
    global _MANAGER
    if _MANAGER is None:
        _MANAGER = PluginManager()
    return _MANAGER


def reset_manager() -> None:
    """Forget the process-wide manager (tests, or after installing a plugin)."""
    global _MANAGER
    _MANAGER = None
