"""millis's native CPU kernels: C sources compiled on first use, one build per ISA, chosen at run time.

`build(name, sources, isa)` compiles the sources with the system C compiler (`$CC`, else `cc`) into
the millis cache, once per (source text, flags), atomically (a concurrent build never loads a half-
written file). `native_isa()` picks the best build the CPU runs: `avx2` (AVX2 + FMA + F16C: the
SIMD kernels) or `scalar` (plain C, the reference the tests compare the SIMD kernels against).
`MILLIS_KERNEL_ISA=scalar` forces the scalar build; `MILLIS_NO_KERNELS=1` disables native kernels.

On AVX-512 CPUs the `avx2` kernels run (no AVX-512 / VNNI / AMX specific kernels yet).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from millis.common.errors import MillisError

HERE = Path(__file__).parent
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "scalar": [],
}
COMMON_FLAGS = ["-O3", "-pthread", "-shared", "-fPIC", "-std=gnu11", "-fvisibility=hidden"]


def native_isa() -> str | None:
    """The build this CPU runs, or None when native kernels are off (MILLIS_NO_KERNELS, not x86-64)."""
    from millis.common.hardware import cpu_flags

    if os.environ.get("MILLIS_NO_KERNELS"):
        return None
    forced = os.environ.get("MILLIS_KERNEL_ISA", "")
    if forced:
        if forced not in ISA_FLAGS:
            raise MillisError(f"MILLIS_KERNEL_ISA={forced!r}: expected one of {', '.join(ISA_FLAGS)}")
        return forced
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma", "f16c"} <= cpu_flags():
        return "avx2"
    return "scalar"


@functools.cache
def build(name: str, sources: tuple[str, ...], isa: str, flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile `sources` (file names in this folder, plus the headers they include) for `isa`, with
    `flags` replacing the common ones (the per-row int8 kernel: OpenMP, every symbol visible)."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise MillisError(f"no C compiler ({cc}) on PATH: millis's native kernels are built on first use")
    if isa != "scalar" and platform.machine() not in ("x86_64", "AMD64"):
        raise MillisError(f"the {isa} kernels need an x86-64 CPU")
    flags = list(flags or COMMON_FLAGS) + ISA_FLAGS[isa]
    texts = b"".join((HERE / f).read_bytes() for f in sorted(set(sources) | {h.name for h in HERE.glob("*.h")}))
    key = hashlib.sha256(texts + " ".join(flags).encode()).hexdigest()[:16]
    from millis.common.files import cache_dir

    so = cache_dir() / "kernels" / f"{name}-{isa}-{key}.so"
    if not so.is_file():
        so.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
            out = Path(tmp) / so.name
            cmd = [cc, *flags, *(str(HERE / s) for s in sources), "-o", str(out), "-lm"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                raise MillisError(f"building the {isa} kernels failed: {r.stderr.strip()[-800:]}")
            os.replace(out, so)
    import torch  # noqa: F401 -- load torch's libgomp first: one OpenMP runtime in the process

    return ctypes.CDLL(str(so))
