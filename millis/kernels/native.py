"""millis's native CPU kernels: C sources compiled on first use, one build per ISA, chosen at run time.

`build(name, sources, isa)` compiles the sources with the system C compiler (`$CC`, else `cc`) into
the millis cache, once per (source text, flags), atomically (a concurrent build never loads a half-
written file; one build at a time in a cache, the others waiting to reuse it): each source to an object of its own,
as many at once as the process has CPUs, cached and shared between libraries (cold, the
encoder's and the decoder's three builds each took 57 s one source after another on a 2-core Zen 4, 21 s so: ad hoc,
timed once). `native_isa()` picks the best build the CPU runs: `avx2` (AVX2 + FMA + F16C: the
SIMD kernels), `avx512` (the same sources built with AVX-512 BW / VL + VNNI + BF16 on top: the integer
dot products become `vpdpbusd` / `vpdpwssd`, with the same integer sums, so the same results, and 32
vector registers) or `scalar` (plain C, the reference the tests compare the SIMD kernels against).
`MILLIS_KERNEL_ISA=avx512|avx2|scalar` forces a build the CPU runs; `MILLIS_NO_KERNELS=1` disables them.
AMX (Sapphire Rapids and later): the `avx512` build also holds amx.c's tile GEMMs (bf16 matrices in AMX
tiles; int8 tiles beside block-format matrices for 16 tokens or more), used when `init_amx` finds the tile
unit usable; `MILLIS_NO_AMX=1` set before the first load keeps everything on the AVX-512 kernels (set later, it keeps
that load's layouts off the tiles only: `init_amx`).
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import logging
import mmap
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from millis.common.errors import MillisError
from millis.common.config import env_switch

log = logging.getLogger("millis.kernels")
HERE = Path(__file__).parent
ISA_FLAGS = {  # best first
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni",
               "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-mamx-int8",  # AMX: amx.c's intrinsics, run if present
               "-mprfchw"],  # __builtin_prefetch(p, 1) as prefetchw (every AVX-512 CPU has it)
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "scalar": [],
}
ISA_CPU_FLAGS = {  # /proc/cpuinfo flags each build needs
    "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"},
    "avx2": {"avx2", "fma", "f16c"},
    "scalar": set(),
}
COMMON_FLAGS = ["-O3", "-pthread", "-shared", "-fPIC", "-std=gnu11", "-fvisibility=hidden"]


def native_isa() -> str | None:
    """The build this CPU runs, or None when native kernels are off (MILLIS_NO_KERNELS, not x86-64)."""
    if env_switch("MILLIS_NO_KERNELS"):
        return None
    forced = os.environ.get("MILLIS_KERNEL_ISA", "")
    if forced:
        if forced not in ISA_FLAGS:
            raise MillisError(f"MILLIS_KERNEL_ISA={forced!r}: expected one of {', '.join(ISA_FLAGS)}")
        if forced not in runnable_isas():
            raise MillisError(f"MILLIS_KERNEL_ISA={forced}: this CPU runs only {', '.join(runnable_isas())}")
        return forced
    return runnable_isas()[0]


def runnable_isas() -> list[str]:
    """Every build this CPU runs, best first (the tests check each SIMD build against `scalar`)."""
    from millis.common.hardware import cpu_flags

    if platform.machine() not in ("x86_64", "AMD64"):
        return ["scalar"]
    have = cpu_flags()
    return [isa for isa, need in ISA_CPU_FLAGS.items() if need <= have]


@functools.cache
def build(name: str, sources: tuple[str, ...], isa: str, flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile `sources` (file names in this folder, plus the headers they include) for `isa`, with
    `flags` replacing the common ones (the per-row int8 kernel: OpenMP, every symbol visible). Each source is
    compiled to an object of its own, as many at once as the process has CPUs (`compile_objects`), cached by its
    text, the headers' and the flags (the encoder's and the decoder's libraries share seven of their sources'
    objects), then linked."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise MillisError(f"no C compiler ({cc}) on PATH: millis's native kernels are built on first use")
    if isa != "scalar" and platform.machine() not in ("x86_64", "AMD64"):
        raise MillisError(f"the {isa} kernels need an x86-64 CPU")
    flags = list(flags or COMMON_FLAGS) + ISA_FLAGS[isa]
    headers = b"".join((HERE / h.name).read_bytes() for h in sorted(HERE.glob("*.h")))
    texts = b"".join((HERE / f).read_bytes() for f in sorted(set(sources) | {h.name for h in HERE.glob("*.h")}))
    key = digest(texts, flags)
    from millis.common.files import cache_dir

    so = cache_dir() / "kernels" / f"{name}-{isa}-{key}.so"
    obj_dir = objects_dir(so)
    # one build at a time in this cache (processes starting together: the first builds, the others wait and reuse);
    # a library already built loads without the lock (a read-only cache, or another library's build under way)
    with contextlib.ExitStack() if usable(so) else build_lock(obj_dir):
        if not usable(so):  # one someone else could have written is built again over it
            objs = [obj_dir / f"{Path(s).stem}-{isa}-{digest((HERE / s).read_bytes() + headers, flags)}.o"
                    for s in sources]
            cflags = [f for f in flags if f != "-shared"]
            todo = [(s, o) for s, o in zip(sources, objs) if not usable(o)]
            compile_objects(cc, cflags, isa, todo)
            try:
                link(cc, flags, objs, so, isa)
            except MillisError:
                if len(todo) == len(sources):
                    raise
                # an object reused from the cache was damaged (a crash before it reached the disk): all anew, once
                compile_objects(cc, cflags, isa, list(zip(sources, objs)))
                link(cc, flags, objs, so, isa)
    if "-fopenmp" in flags:
        import torch  # noqa: F401 -- load torch's libgomp first: one OpenMP runtime in the process

    return ctypes.CDLL(str(so))


@contextlib.contextmanager
def build_lock(obj_dir: Path):
    """The cache's build lock (flock on obj/.lock), or none where the file system has no locks (builds then may run
    twice at once: each file still lands whole, `settle`)."""
    lock = None
    try:
        lock = open(obj_dir / ".lock", "a")
        fcntl.flock(lock, fcntl.LOCK_EX)
    except OSError as e:
        log.warning("millis kernels: no build lock in %s (%s): building without it", obj_dir, e)
    try:
        yield
    finally:
        if lock is not None:
            lock.close()


def digest(text: bytes, flags: list[str]) -> str:
    """What names a built file: the sources' and headers' text and the compiler's flags."""
    return hashlib.sha256(text + " ".join(flags).encode()).hexdigest()[:16]


def objects_dir(so: Path) -> Path:
    """The cache's kernels/ and kernels/obj/ folders, made private and checked as such (millis loads code from them)."""
    from millis.common.files import own_file

    for d in (so.parent, so.parent / "obj"):
        d.mkdir(mode=0o700, exist_ok=True)
        if not own_file(d):
            raise MillisError(f"{d} can be written by another user: millis loads its kernels from there")
    return so.parent / "obj"


def usable(p: Path) -> bool:
    """A built file to reuse: present, not empty, and this user's alone (another's could hold planted code)."""
    from millis.common.files import own_file

    return p.is_file() and p.stat().st_size > 0 and own_file(p)


def settle(tmp: Path, final: Path) -> None:
    """A file written under a temporary name put in place once on the disk (a crash leaves no empty object behind a
    name that says it is built)."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def compile_objects(cc: str, flags: list[str], isa: str, jobs: list[tuple[str, Path]]) -> None:
    """Each (source, object) compiled, as many at once as this process has CPUs (the next starts as one ends), each
    written under a temporary name, then put in place (`settle`: a concurrent build never reads a half-written
    object). A failure names its source once those running have ended (none starts after it); an interruption ends
    the compilers still running."""
    if not jobs:
        return
    width = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    failed = ""
    with tempfile.TemporaryDirectory(dir=jobs[0][1].parent) as tmp:
        pending, running = list(jobs), []
        try:
            while running or (pending and not failed):
                while pending and not failed and len(running) < width:
                    src, obj = pending.pop(0)
                    out = Path(tmp) / obj.name
                    with open(Path(tmp) / f"{obj.name}.log", "w") as err:  # (a pipe could fill); the child keeps it
                        running.append((src, obj, out, subprocess.Popen(  # its own group: its cc1 ends with it
                            [cc, *flags, "-c", str(HERE / src), "-o", str(out)], stdout=subprocess.DEVNULL,
                            stderr=err, start_new_session=True)))
                ended = [r for r in running if r[3].poll() is not None]
                if not ended:
                    time.sleep(0.01)
                for src, obj, out, p in ended:
                    running.remove((src, obj, out, p))
                    if p.returncode:
                        text = (Path(tmp) / f"{obj.name}.log").read_text(errors="replace")
                        failed = failed or f"{src}: {text.strip()[-800:]}"
                    else:
                        settle(out, obj)
        finally:
            for *_, p in running:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
    if failed:
        raise MillisError(f"building the {isa} kernels failed: {failed}")


def link(cc: str, flags: list[str], objs: list[Path], so: Path, isa: str) -> None:
    """The objects linked into `so`, written under a temporary name, then renamed into place."""
    with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
        out = Path(tmp) / so.name
        r = subprocess.run([cc, *flags, *map(str, objs), "-o", str(out), "-lm"], capture_output=True, text=True)
        if r.returncode:
            raise MillisError(f"building the {isa} kernels failed: {r.stderr.strip()[-800:]}")
        settle(out, so)


P, I32, I64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
# blockq.h's type ids beside ggml's: millis's int8 (Q8_0 bytes x int16 activations), int7 (Q7_0) and bf16
# (bf16 weights x bf16 activation rows)
TYPE_F32, TYPE_Q8_0, TYPE_Q8_0_X16, TYPE_Q7_0, TYPE_BF16_PAIRS, TYPE_Q7_A7 = 0, 8, 108, 109, 110, 111
TYPE_BF16_AMX = 112  # bf16 in AMX's 16-row tiles (amx.c): the tile unit where init_amx allows it, else plain C
TYPE_Q7_ROW = 113  # Q7_0's bytes, one scale per row, against 7-bit activations with one scale per token
TYPE_Q7_ROW8 = 114  # the same weights against 8-bit activations with one scale per token
TYPE_Q8_ROW = 115  # ROW8's layout with weights in [-127, 127] (one scale per row), 8-bit activations per token
XBLOCK_BYTES = 48  # one activation block (blockq.h xblock): scale, scaled sum, integer sum, 32 int8, 2 half sums


class Mat(ctypes.Structure):  # blockq.h mat
    _fields_ = [("type", I32), ("packed", I32), ("data", P), ("rows", I64), ("cols", I64), ("row_bytes", I64),
                ("tiles", P)]  # tiles: AMX Q8 tiles of the same values, or None (add_amx_tiles)


def amx_expected() -> bool:
    """Whether native bf16 matrices should run on AMX here (the CPU's flags and the build; what benches
    record: init_amx also needs the kernel's grant, asked for in the process that runs them)."""
    from millis.common.hardware import cpu_flags

    return (native_isa() == "avx512" and {"amx_tile", "amx_bf16", "amx_int8"} <= cpu_flags()
            and not env_switch("MILLIS_NO_AMX"))


def init_amx(lib: ctypes.CDLL) -> bool:
    """Whether `lib` runs amx.c's tile GEMMs on the tile unit (bf16 matrices in AMX tiles, int8 tiles beside
    block-format ones): the `avx512` build on a CPU with AMX-BF16 and AMX-INT8 whose kernel grants the tile
    state, unless MILLIS_NO_AMX is set. Callers build those layouts only then. The library's one flag also picks
    the bf16 attention's kernel (tiles or vectors) for every model of the process, so every native model asks at
    its load, whatever its precision (an int8 model's attention moved to the tiles once a bf16 model loaded), and
    MILLIS_NO_AMX keeps a load's layouts off the tiles without taking the grant back from models loaded before it
    (their tile matrices fell to the C form; set it before the first load to keep AMX off)."""
    if env_switch("MILLIS_NO_AMX"):
        return False
    lib.amx_init.restype, lib.amx_init.argtypes = ctypes.c_int, [ctypes.c_int]
    got = lib.amx_init(1)
    if got < 0:  # the CPU has AMX, the kernel refused its state (e.g. a thread's signal stack below its minimum)
        log.warning("millis kernels: the kernel refused AMX's tile state (%s): the AVX-512 kernels run instead",
                    os.strerror(-got))
    return got > 0


# amx.c's int8 Q8 tiles beside block-format matrices: off. Run on Sapphire Rapids (2026-12-02, 2 threads, the
# same bits) they were slower than the AVX-512 VNNI block kernels: SmolLM2 Q4_1 prefill of 16 / 128 / 512 tokens
# 1.18x / 1.06x / 1.01x their time (after vectorizing the per-block float step: 1.6x before), MiniLM int8
# b1xs128 1.07x; and they add 1.5 bytes per weight. bf16 matrices keep the tile unit (3.4x faster there).
Q8_TILES = False


def q8_tiles(lib: ctypes.CDLL) -> bool:
    """Whether block-format matrices get amx.c's Q8 tiles: Q8_TILES, where init_amx allows the tile unit."""
    return Q8_TILES and init_amx(lib)


def add_amx_tiles(lib: ctypes.CDLL, raw: Mat, m: Mat, keep: list, threads: int) -> Mat:
    """`m` (`raw` packed, or `raw` itself) with AMX Q8 tiles of `raw` (GGUF's layout) beside it, which
    products over 16 tokens or more (prefill) run on; `m` unchanged when `raw`'s type has none (amx.c)."""
    dst = relaid(lib, "amxq_bytes", "amxq_pack", raw, keep, threads, "AMX tiles of")
    return m if dst is None else Mat(m.type, m.packed, m.data, m.rows, m.cols, m.row_bytes, dst.ctypes.data)


def pack_matrix(lib: ctypes.CDLL, m: Mat, keep: list, threads: int) -> Mat:
    """`m` re-laid in packed.c's layout (8 rows interleaved) when the build packs its type, else `m`.
    The packed copy goes to `keep`; the GGUF bytes are then no longer read."""
    dst = relaid(lib, "packed_bytes", "repack", m, keep, threads, "repacking")
    return m if dst is None else Mat(m.type, 1, dst.ctypes.data, m.rows, m.cols, m.row_bytes)


def relaid(lib: ctypes.CDLL, size_fn: str, fill_fn: str, m: Mat, keep: list, threads: int, what: str):
    """A copy of `m`'s values that lib's `fill_fn` writes in the layout `size_fn` sizes (appended to `keep`),
    or None when that layout does not take `m`'s type in this build."""
    size, fill = getattr(lib, size_fn), getattr(lib, fill_fn)
    size.restype, size.argtypes = I64, [I32, I64, I64]
    fill.restype, fill.argtypes = ctypes.c_int, [P, P, ctypes.c_int]
    n = size(m.type, m.rows, m.cols)
    if not n:
        return None
    dst = weight_array(keep, n)
    if fill(ctypes.addressof(m), dst.ctypes.data, threads):
        raise MillisError(f"{what} a type {m.type} matrix failed")
    keep.append(dst)
    return dst


class HugePages:
    """A model's re-laid weights in 2 MB pages where Linux grants them (madvise MADV_HUGEPAGE, with
    transparent_hugepage at `madvise` or `always`): a few TLB entries then map every matrix, where 4 KB pages
    missed the TLB in each (a Zen 4 core's 3072 second-level entries map 12 MB; bge-small int7-row holds 21 MB,
    BERT-base 85 MB, and each thread of the token split reads all of it every forward). Zen 4 VM, 2 threads,
    alternated in one process (ad hoc): BERT-base int7-row b1xs128 0.96x the forward's time, bge-small 0.99x.
    Anonymous mappings of CHUNK bytes (more for a larger matrix), handed out 64-byte aligned; one arena per model
    (in its `keep`), so its memory goes with the model."""
    CHUNK = 32 << 20

    def __init__(self):
        self.buf: np.ndarray | None = None
        self.used = 0

    def array(self, n: int) -> np.ndarray:
        at = (self.used + 63) // 64 * 64
        if self.buf is None or at + n > len(self.buf):
            size = max(self.CHUNK, (n + (2 << 20) - 1) // (2 << 20) * (2 << 20))
            region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            region.madvise(mmap.MADV_HUGEPAGE)
            self.buf, at = np.frombuffer(region, np.uint8), 0  # the array holds the mapping
        self.used = at + n
        return self.buf[at:at + n]


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array whose data starts on a 64-byte boundary (a cache line; numpy's own start 16 bytes
    apart, so every 64-byte vector access to rows a multiple of 64 bytes long then spans two lines)."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(n + 64, np.uint8)
    at = -raw.ctypes.data % 64
    return raw[at:at + n].view(dtype).reshape(shape)  # the view holds raw


def weight_array(keep: list, n: int) -> np.ndarray:
    """n bytes for a re-laid matrix of the model whose arrays `keep` holds: in its HugePages arena (created in
    `keep` on first use) where the platform advises huge pages, else a plain array."""
    if not hasattr(mmap, "MADV_HUGEPAGE") or not hasattr(mmap, "MAP_ANONYMOUS"):
        return np.empty(n, np.uint8)
    arena = next((k for k in keep if isinstance(k, HugePages)), None)
    if arena is None:
        arena = HugePages()
        keep.append(arena)
    return arena.array(n)


def offsets(start, n: int, exact: bool = False) -> np.ndarray:
    """Sequence offsets (S + 1,) as int32, after checking them: the C reads start[0..S] and the rows between
    unchecked (an empty array made S -1). Rising, within n rows; exact: from 0 to n (bert_forward's tokens)."""
    s = np.asarray(start)
    ok = s.ndim == 1 and len(s) >= 1 and np.issubdtype(s.dtype, np.integer)
    if ok:
        s = s.astype(np.int64)  # (np.diff of unsigned offsets would wrap)
        ok = s[0] >= 0 and s[-1] <= n and bool((np.diff(s) >= 0).all()) and not (exact and (s[0] or s[-1] != n))
    if not ok:
        raise MillisError(f"sequence offsets must be a 1-D integer array rising from {'0' if exact else '>= 0'} to "
                          f"{'' if exact else 'at most '}{n} (the tokens), got {np.asarray(start)!r}"[:400])
    return np.ascontiguousarray(s, np.int32)


def kept_tokens(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A (B, T) 0 / 1 mask -> the kept tokens' rows and columns (n,) in row order, and each row's offsets in that
    flat order (B + 1,): how the native encoder's flat forward takes a padded batch."""
    rows, cols = np.nonzero(mask)
    return rows, cols, np.concatenate([[0], np.cumsum(np.count_nonzero(mask, axis=1))])


def contiguous_masks(mask: np.ndarray) -> bool:
    """Whether each row's ones of a (B, T) 0 / 1 mask are one run: the kept tokens' distances in the flat batch
    are then their columns' (a relative bias or a window measured on the flat tokens equals HF's on columns)."""
    m = np.asarray(mask) != 0
    if m.ndim != 2:
        return False
    cols = np.arange(m.shape[1])
    first, count = m.argmax(1)[:, None], m.sum(1)[:, None]
    return bool(((cols >= first) & (cols < first + count) == m).all())
