"""Reading Detectron2 checkpoints without running code from them.

Detectron2's model-zoo files (``model_final_*.pkl``) are pickles of
``{"model": {name: numpy.ndarray}, "__author__": ..., ...}``; checkpoints written by its
trainer (``.pth``) are ``torch.save`` files of ``{"model": state_dict, ...}``. A pickle can name
any importable callable, so loading one with :mod:`pickle` would run whatever it names. Here:

* ``.pkl`` goes through :class:`NumpyOnlyUnpickler`, which resolves only the handful of globals
  that rebuild numpy arrays (plus ``OrderedDict`` and a latin-1-only ``_codecs.encode``, which
  protocol-2 pickles use for raw bytes). Any other global is refused, *before* it is called,
  with "would run code: <module.name>".
* ``.pth`` / ``.pt`` goes through ``torch.load(weights_only=True)`` (PyTorch's own restricted
  unpickler, tensors and plain containers only).

Parameter names are Detectron2's (``roi_heads.keypoint_head.conv_fcn1.weight``,
``backbone.bottom_up.res2.0.conv1.weight``, ``proposal_generator.rpn_head.conv.weight``...);
:func:`load_into` copies a prefix of them into a module whose own names are Detectron2's
minus that prefix, checking every shape, and reports missing names in one line.
"""

from __future__ import annotations

import collections
import io
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from damo_plugins.core.errors import DamoError, first_line

#: prefix of the keypoint head's parameters in a whole Keypoint R-CNN checkpoint
KEYPOINT_HEAD_PREFIX = "roi_heads.keypoint_head."


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes``; no other codec."""
    if not isinstance(text, str) or encoding.lower().replace("-", "") not in ("latin1",):
        raise DamoError(f"would run code: _codecs.encode with codec {encoding!r}")
    return text.encode("latin1")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The globals a pickled numpy array names, under numpy 1 and numpy 2 module paths."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): _latin1_encode,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    try:
        from numpy._core.numeric import _frombuffer  # what pickles of non-contiguous arrays name
    except ImportError:  # pragma: no cover - numpy 1
        _frombuffer = None
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = _frombuffer
    return {k: v for k, v in allowed.items() if v is not None}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays, dicts, lists and scalars and nothing else."""

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise DamoError(
                f"would run code: {module}.{name}",
                "refused to load this pickle; Detectron2 checkpoints hold only numpy arrays",
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise DamoError(
            "would run code: a persistent id in a .pkl (a torch.save file renamed?)",
            "save it as .pth; it is then read with torch.load(weights_only=True)",
        )


def loads_numpy_pickle(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`NumpyOnlyUnpickler` (latin-1 for Python 2 pickles)."""
    try:
        return NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except DamoError:
        raise
    except Exception as exc:
        raise DamoError(
            f"not a readable pickle: {type(exc).__name__}: {first_line(exc)[:200]}"
        ) from exc


def read_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """``{name: float32 array}`` from a Detectron2 ``.pkl`` or ``.pth``/``.pt`` checkpoint."""
    p = Path(path)
    if not p.is_file():
        raise DamoError(f"checkpoint not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".pkl":
        payload = loads_numpy_pickle(p.read_bytes())
    elif suffix in (".pth", ".pt"):
        import torch

        try:
            payload = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DamoError(
                f"refused to load {p.name}: {first_line(exc)[:200]}",
                "only tensors and plain containers are read (torch.load weights_only=True)",
            ) from exc
    else:
        raise DamoError(
            f"unknown checkpoint type '{p.suffix}' ({p.name})", "give a Detectron2 .pkl or .pth"
        )
    return state_dict_of(payload, p.name)


def state_dict_of(payload: Any, label: str = "checkpoint") -> dict[str, np.ndarray]:
    """The name -> array mapping of a loaded checkpoint (``{"model": {...}}`` or flat)."""
    if isinstance(payload, Mapping) and isinstance(payload.get("model"), Mapping):
        payload = payload["model"]
    if not isinstance(payload, Mapping):
        raise DamoError(
            f"{label} holds a {type(payload).__name__}, not a dict of parameters",
            'expected {"model": {name: array}} (Detectron2) or a state_dict',
        )
    out: dict[str, np.ndarray] = {}
    for name, value in payload.items():
        if hasattr(value, "detach"):  # torch tensor from a .pth
            value = value.detach().cpu().numpy()
        if isinstance(value, np.ndarray) and value.dtype.kind in "fiu":
            out[str(name)] = value
    if not out:
        raise DamoError(f"{label} holds no numeric arrays", "is it a Detectron2 checkpoint?")
    return out


def load_into(
    module: Any,
    state: Mapping[str, np.ndarray],
    prefix: str,
    rename: Mapping[str, str] | None = None,
) -> list[str]:
    """Copy ``state[prefix + name]`` into each parameter/buffer ``name`` of ``module``.

    ``rename`` maps a module name to its Detectron2 name where they differ. Every module
    tensor must be present with the same shape (one line names what is missing or differs);
    returns the checkpoint names under ``prefix`` that the module did not use.
    """
    import torch

    rename = dict(rename or {})
    own = module.state_dict()
    missing, wrong = [], []
    used = set()
    for name, tensor in own.items():
        key = prefix + rename.get(name, name)
        if key not in state:
            missing.append(key)
            continue
        value = np.asarray(state[key])
        if tuple(value.shape) != tuple(tensor.shape):
            wrong.append(f"{key} {list(value.shape)} vs {list(tensor.shape)}")
            continue
        used.add(key)
        with torch.no_grad():
            tensor.copy_(torch.from_numpy(np.ascontiguousarray(value)).to(tensor.dtype))
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise DamoError(
            f"checkpoint lacks {len(missing)} parameter(s): {shown}",
            "is it a Detectron2 Keypoint R-CNN checkpoint with this architecture?",
        )
    if wrong:
        raise DamoError(
            f"checkpoint shapes differ: {'; '.join(wrong[:3])}",
            "build the model with the checkpoint's sizes (e.g. --num-keypoints)",
        )
    return sorted(k for k in state if k.startswith(prefix) and k not in used)
