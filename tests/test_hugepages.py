"""Re-laid weights in a per-model arena advised for 2 MB pages (millis.kernels.native.weight_array): aligned,
disjoint arrays, one arena per `keep`, the mapping marked for huge pages (VmFlags `hg` in /proc/self/smaps), and
matrices larger than a chunk in their own mapping."""
import mmap
from pathlib import Path

import numpy as np
import pytest

from millis.kernels.native import HugePages, weight_array

pytestmark = pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no madvise(MADV_HUGEPAGE) here")


def vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping that holds `address` (Linux /proc/self/smaps)."""
    flags, inside = None, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            flags = line.split()[1:]
    assert flags is not None, "no mapping holds the address"
    return flags


def test_weight_arrays_are_aligned_disjoint_and_advised():
    keep: list = []
    sizes = [100, 4096, 3 * 64 + 1, 1 << 20, 7]
    arrays = [weight_array(keep, n) for n in sizes]
    assert sum(isinstance(k, HugePages) for k in keep) == 1  # one arena per model, kept with its arrays
    spans = []
    for a, n in zip(arrays, sizes):
        assert a.dtype == np.uint8 and a.shape == (n,) and a.flags.writeable
        assert a.ctypes.data % 64 == 0
        spans.append((a.ctypes.data, a.ctypes.data + n))
    spans.sort()
    assert all(hi <= lo2 for (_, hi), (lo2, _) in zip(spans, spans[1:])), "arrays overlap"
    for i, a in enumerate(arrays):
        a[:] = i + 1
    assert all((a == i + 1).all() for i, a in enumerate(arrays))
    if Path("/proc/self/smaps").exists():
        assert "hg" in vm_flags(arrays[0].ctypes.data)


def test_a_matrix_larger_than_a_chunk_gets_its_own_mapping():
    keep: list = []
    small = weight_array(keep, 1000)
    big = weight_array(keep, HugePages.CHUNK + 5)
    after = weight_array(keep, 1000)  # from the big one's mapping: the first chunk is not reused
    assert big.shape == (HugePages.CHUNK + 5,) and big.ctypes.data % 64 == 0
    assert not (small.ctypes.data <= big.ctypes.data < small.ctypes.data + HugePages.CHUNK)
    assert big.ctypes.data + big.size <= after.ctypes.data
    other: list = []
    assert weight_array(other, 10).base is not small.base  # another model: another arena
