"""What machine and software a measurement ran on (recorded in millis.json and reports)."""
from __future__ import annotations

import math
import os
import platform
from functools import lru_cache
from pathlib import Path

CGROUP = "sys/fs/cgroup"  # under the root directory ("/"; tests point it at fake files)
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


def _cgroup_dirs(root: Path, controller: str) -> list[Path]:
    """The cgroup directories whose limits bind this process for a v1 `controller` ("" = cgroup v2): its own, then
    its ancestors up to the mount. /proc/self/cgroup names the path; inside a container the mount is often the
    container's own cgroup already, so a path missing under it is skipped and the mount itself still counts."""
    path = "/"
    try:
        for line in (root / "proc/self/cgroup").read_text().splitlines():
            _, names, where = line.split(":", 2)
            if (names == "" if controller == "" else controller in names.split(",")):
                path = where
                break
    except (OSError, ValueError):
        pass
    base = root / CGROUP
    mounts = [base] if controller == "" else [base / controller, base / f"{controller},cpuacct"]
    out = []
    for mount in (m for m in mounts if m.is_dir()):
        d = mount / path.lstrip("/")
        while True:
            if d.is_dir() and d not in out:
                out.append(d)
            if d == mount or mount not in d.parents:
                break
            d = d.parent
    return out


def _read(p: Path) -> str | None:
    try:
        return p.read_text().strip()
    except OSError:
        return None


def _stat_field(p: Path, key: str) -> int:
    """One counter of a cgroup's memory.stat, or 0."""
    for line in (_read(p) or "").splitlines():
        k, _, v = line.partition(" ")
        if k == key and v.strip().isdigit():
            return int(v)
    return 0


def cgroup_cpus(root: str | Path = "/") -> int | None:
    """The CPUs a cgroup CPU quota allows (ceil(quota / period), the tightest along the path), or None: no quota.
    v2 cpu.max ("max 100000" or "150000 100000"); v1 cpu.cfs_quota_us (-1 = none) / cpu.cfs_period_us."""
    root, limits = Path(root), []
    for d in _cgroup_dirs(root, ""):
        parts = (_read(d / "cpu.max") or "").split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit() and int(parts[1]):
            limits.append(math.ceil(int(parts[0]) / int(parts[1])))
    for d in _cgroup_dirs(root, "cpu"):
        quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
        if quota and period and quota.isdigit() and period.isdigit() and int(period):  # "-1" is not isdigit
            limits.append(math.ceil(int(quota) / int(period)))
    return max(1, min(limits)) if limits else None


def cgroup_memory(root: str | Path = "/") -> int | None:
    """Bytes a cgroup memory limit leaves: limit - usage, the tightest along the path, or None: no limit. Usage
    less its inactive file cache, which the kernel reclaims before it kills (as `docker stats` counts it): a model
    file just read must not look like memory in use. v2 memory.max / memory.current; v1 memory.limit_in_bytes /
    memory.usage_in_bytes (an unlimited v1 group shows a huge limit, which min() ignores)."""
    root, left = Path(root), []
    for ctl, limit, usage, inactive in (("", "memory.max", "memory.current", "inactive_file"),
                                        ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
                                         "total_inactive_file")):
        for d in _cgroup_dirs(root, ctl):
            lim, used = _read(d / limit), _read(d / usage)
            if lim and used and lim.isdigit() and used.isdigit():  # v2 "max": no limit
                used_now = max(0, int(used) - _stat_field(d / "memory.stat", inactive))
                left.append(max(0, int(lim) - used_now))
    return min(left) if left else None


def usable_cpus(root: str | Path = "/") -> int:
    """Logical CPUs this process may use: its affinity mask (each hyper-thread counts as one), within the cgroup's
    CPU quota (a container given 2 CPUs of a 64-core host runs 64 threads 32x over-subscribed otherwise)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpus(root)
    return max(1, n if quota is None else min(n, quota))


def available_memory(root: str | Path = "/") -> int:
    """Bytes of memory available to new allocations: MemAvailable within the cgroup's limit, or 4 GiB when
    neither is known."""
    known = [m for m in (_mem_available(Path(root)), cgroup_memory(root)) if m is not None]
    return min(known) if known else 4 << 30


def _mem_available(root: Path) -> int | None:
    try:
        with open(root / "proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


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


def source_revision() -> str:
    """The git commit millis runs from (with "+dirty" when its tree has changes), or "" outside a checkout."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    if head.returncode:
        return ""
    return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
