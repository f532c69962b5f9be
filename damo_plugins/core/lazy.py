"""Registered callables that import their code on first use.

Every ``damo-opt`` command, ``--help`` and recipe validation included, loads every plugin and
calls its contribution hooks (the manager must know every name to refuse clashes and suggest
spellings). A model builder lives in a module that imports torch, which costs seconds; handing
the manager the builder itself would make each of those commands pay for torch. A plugin hands
a :class:`LazyCallable` instead: the manager stores it like any callable, and the builder's
module is imported only when the builder is called or one of its attributes
(``default_input_shape``, ``normalize_kwargs``, ...) is read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class LazyCallable:
    """Stands for ``getattr(loader(), attr)`` and imports it on first call or attribute read.

    ``loader`` returns the module (or any object) holding the callable; keeping the import in
    a function of the plugin module keeps it visible to ``tests/core/test_layering.py``.
    """

    __slots__ = ("_attr", "_loader", "_target")

    def __init__(self, loader: Callable[[], Any], attr: str) -> None:
        self._loader = loader
        self._attr = attr
        self._target: Callable[..., Any] | None = None

    def resolve(self) -> Callable[..., Any]:
        """The real callable (imported the first time)."""
        if self._target is None:
            self._target = getattr(self._loader(), self._attr)
        return self._target

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # only reached for names not found on the proxy; private and dunder names are not
        # forwarded so copy/pickle/introspection never import the target by accident
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.resolve(), name)

    def __repr__(self) -> str:
        state = "loaded" if self._target is not None else "not loaded yet"
        return f"<lazy {self._attr} ({state})>"


def lazy(loader: Callable[[], Any], attr: str) -> LazyCallable:
    """``lazy(_models, "build_x")``: a callable that imports ``_models().build_x`` on first use."""
    return LazyCallable(loader, attr)
