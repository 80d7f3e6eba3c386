"""What machine and software a measurement ran on (recorded in millis.json and reports)."""
from __future__ import annotations

import os
import platform
from functools import lru_cache

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8")


@lru_cache(maxsize=1)
def cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ("flags", "model name", "cpu family", "model", ...), or {}."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    return frozenset(cpuinfo().get("flags", "").split())


def cpu_model() -> str:
    return cpuinfo().get("model name") or platform.processor() or "unknown"


def cpu_family_model() -> str:
    """'family F model M', or "" when unknown. A VM's model name is often just "AMD EPYC": AMD family 25 is
    Zen 3 (model 1: Milan) or Zen 4 (model 17: Genoa), family 26 Zen 5."""
    info = cpuinfo()
    return f"family {info['cpu family']} model {info['model']}" if {"cpu family", "model"} <= info.keys() else ""


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask; each hyper-thread counts as one)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, n)


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable), or 4 GiB when unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 4 << 30


def has_amx() -> bool:
    return {"amx_bf16", "amx_int8"} <= cpu_flags()


def has_bf16() -> bool:
    """Native bf16 arithmetic (AMX tiles or AVX512-BF16); elsewhere bf16 is emulated or ignored."""
    return has_amx() or "avx512_bf16" in cpu_flags()


def has_cuda() -> bool:
    """A CUDA GPU torch can use (torch imported only when asked)."""
    import torch

    return torch.cuda.is_available()


def describe() -> dict:
    """Machine and library versions, JSON-ready."""
    versions = {}
    for mod in ("torch", "transformers", "onnx", "onnxruntime", "openvino", "nncf", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # an optional runtime not installed
            pass
    return {"cpu": cpu_model(), "cpu_id": cpu_family_model(), "cores": usable_cpus(),
            "isa": sorted(f for f in ISA_FLAGS if f in cpu_flags()), "machine": platform.machine(),
            "python": platform.python_version(), "versions": versions, "gpu": gpu_name()}


def gpu_name() -> str:
    """The CUDA GPU torch would use, or "" (none, or torch not imported yet: nothing is imported here)."""
    import sys

    torch = sys.modules.get("torch")
    try:
        return torch.cuda.get_device_name() if torch is not None and torch.cuda.is_available() else ""
    except Exception:  # noqa: BLE001 -- a broken driver is "no GPU" for a description
        return ""
