"""What machine a measurement was made on: CPU, the instruction sets INT8/bf16 depend on, cores,
memory, library versions.

A latency or a speed-up means little without it: INT8 gains come from VNNI/AMX, OpenVINO runs
FP32 models in bf16 by default on CPUs with AVX512-BF16/AMX, and a 2-vCPU guest shared with
other jobs measures differently from a quiet workstation. Benchmark reports and the
``optimize`` command print this next to their numbers. Reading it imports none of the heavy
libraries (versions come from package metadata) unless OpenVINO's default precision is asked.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

#: CPU flags that change what INT8 / bf16 inference can use, in the order we print them
ISA_FLAGS: tuple[str, ...] = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
#: import name -> distribution name of the libraries whose version a measurement depends on
PACKAGES: dict[str, str] = {
    "torch": "torch",
    "openvino": "openvino",
    "onnxruntime": "onnxruntime",
    "nncf": "nncf",
    "neural_compressor": "neural-compressor",
}
_PRECISION_NAMES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


@functools.lru_cache(maxsize=1)  # the CPU does not change while a process runs
def _cpu_fields() -> dict[str, str]:
    """``lscpu``'s fields, else the first processor of ``/proc/cpuinfo`` under lscpu's names."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        text = subprocess.run(
            ["lscpu"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
        fields = {
            k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines())
        }
        if fields.get("Model name") or fields.get("Flags"):
            return fields
    names = {
        "model name": "Model name",
        "cpu family": "CPU family",
        "model": "Model",
        "flags": "Flags",
    }
    fields = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # first processor only
            key, _, value = line.partition(":")
            if key.strip() in names:
                fields[names[key.strip()]] = value.strip()
    return fields


def cpu_flags() -> set[str]:
    """The CPU's feature flags (empty where the OS does not tell)."""
    return set(_cpu_fields().get("Flags", "").split())


def has_bf16(flags: set[str] | None = None) -> bool:
    """True when the CPU computes bf16 natively (OpenVINO then defaults to bf16 inference)."""
    flags = cpu_flags() if flags is None else flags
    return "avx512_bf16" in flags or "amx_bf16" in flags


def memory_bytes() -> int | None:
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def versions() -> dict[str, str]:
    """Installed versions of the libraries in :data:`PACKAGES` (missing ones left out)."""
    found = {}
    for name, dist in PACKAGES.items():
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(dist)
    return found


def openvino_default_precision() -> str | None:
    """What OpenVINO's CPU plugin computes float ops in when not told (``f32``, ``bf16``...)."""
    try:
        import openvino as ov

        value = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    except Exception:  # not installed, or no CPU plugin: nothing to report
        return None
    name = str(getattr(value, "get_type_name", lambda: value)())
    return _PRECISION_NAMES.get(name, name)


def has_vnni(flags: set[str] | None = None) -> bool:
    """Whether this CPU multiplies 8-bit values with VNNI (or AMX) instructions.

    Without them (plain AVX2), an INT8 kernel sums pairs of u8 x s8 products in 16 bits
    (``vpmaddubsw``), which saturates for 8-bit weights: quantizers then need 7-bit weights
    (NNCF ``overflow_fix``, ONNX Runtime ``reduce_range``) to keep the model's accuracy.
    """
    flags = set(_cpu_fields().get("Flags", "").split()) if flags is None else flags
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)


def describe(*, openvino_precision: bool = False) -> dict[str, Any]:
    """The machine as a dict (JSON-ready); :func:`summary` turns it into one paragraph.

    ``openvino_precision`` also asks OpenVINO for its CPU default inference precision (it
    imports openvino and creates a ``Core``, ~0.1 s).
    """
    fields = _cpu_fields()
    flags = set(fields.get("Flags", "").split())
    cores = None
    with contextlib.suppress(ValueError):
        cores = int(fields["Core(s) per socket"]) * int(fields.get("Socket(s)", "1"))
    info: dict[str, Any] = {
        "cpu": fields.get("Model name") or platform.processor() or platform.machine(),
        "family_model": f"family {fields.get('CPU family', '?')} model {fields.get('Model', '?')}",
        "hypervisor": fields.get("Hypervisor vendor")
        or ("hypervisor" if "hypervisor" in flags else None),
        "cpus": os.cpu_count(),
        "physical_cores": cores,
        "memory_gb": round(m / 2**30, 1) if (m := memory_bytes()) else None,
        "isa": [f for f in ISA_FLAGS if f in flags],
        "isa_missing": [f for f in ISA_FLAGS if f not in flags] if flags else [],
        "bf16": has_bf16(flags),
        "vnni": has_vnni(flags),
        "python": platform.python_version(),
        "versions": versions(),
    }
    with contextlib.suppress(OSError, AttributeError):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if openvino_precision:
        info["ov_cpu_default_precision"] = openvino_default_precision()
    return info


def summary(info: dict[str, Any] | None = None) -> str:
    """One paragraph: CPU (family/model, guest or not), cores, memory, ISA, versions, load."""
    info = describe() if info is None else info
    guest = f"{info['hypervisor']} guest" if info.get("hypervisor") else "bare metal"
    cores = f"{info['cpus']} logical CPUs"
    if info.get("physical_cores") and info["physical_cores"] != info["cpus"]:
        cores += f" ({info['physical_cores']} cores)"
    parts = [f"{info['cpu']} ({info['family_model']}, {guest}), {cores}"]
    if info.get("memory_gb"):
        parts[0] += f", {info['memory_gb']:g} GiB"
    isa = ", ".join(info["isa"]) or "none of " + "/".join(ISA_FLAGS)
    text = "; ".join(parts) + f"; ISA: {isa}"
    if info.get("isa_missing"):
        text += f" (not present: {', '.join(info['isa_missing'])})"
    libs = ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items())
    text += f". Python {info['python']}" + (f", {libs}" if libs else "") + "."
    if info.get("ov_cpu_default_precision"):
        text += (
            f" OpenVINO CPU default inference precision: **{info['ov_cpu_default_precision']}**."
        )
    if info.get("load_average"):
        text += f" Load average {info['load_average']}."
    return text
