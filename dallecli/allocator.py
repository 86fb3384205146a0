"""The C library's memory allocator, set up so that CPU training steps stay off the kernel's page-fault path
and small-tensor work (decoding one token at a time) off malloc's consolidation path.

Imports nothing heavy: every `dalle` command calls `keep_freed_memory` at start-up, `--help` included."""
from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys

# glibc's mallopt parameters (malloc.h)
_M_MXFAST, _M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = 1, -1, -3, -4
_LARGEST_MMAP_THRESHOLD = 32 << 20  # glibc refuses more on 64-bit systems
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory that tensors free for the next ones instead of handing it back to
    the kernel. True where applied; once per process.

    By default glibc serves each allocation above a threshold (128 kB, raised as large blocks are freed, up to
    32 MB) with a fresh mmap, unmapped again when freed, and returns freed memory at the heap's top to the
    kernel. A training step frees and reallocates the same activations every step, so each step faulted their
    pages in again, zero-filled by the kernel: 7,800 page faults (31 MB) per `tiny-vq` dVAE step, ~17% of its
    time on the 2-core benchmark machine, 22% of the fp32 `tiny` step's, and more where tensors exceed 32 MB
    (the fp32 `paper-stream` prior trains 27% faster without them; docs/benchmarks.md). Here every block comes
    from the heap (no mmap) and the heap is trimmed only above 2 GB free at its top: the process keeps its peak
    heap, as PyTorch's caching allocator does on a GPU.

    Fastbins are off (M_MXFAST 0). They hold freed blocks of up to 128 bytes unmerged, and glibc merges them all
    (malloc_consolidate) before serving any request of 1 kB or more: in a decode step, where every op frees small
    C++ objects and allocates a tensor of a few kB, that took ~3% of the main thread. Without them small blocks
    go to the per-thread cache (tcache) as before, and the overflow is merged as it is freed: `small` cached
    sampling +2–4% on the benchmark machine, the other benchmarks unchanged.

    Left alone where the user tunes malloc through the environment, and on other C libraries."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, _LARGEST_MMAP_THRESHOLD),  # also stops glibc raising it as blocks are freed
                (_M_MMAP_MAX, 0),  # no block through mmap, however large
                (_M_TRIM_THRESHOLD, 2**31 - 1),
                (_M_MXFAST, 0))  # no fastbins: nothing for malloc_consolidate to merge
    return all([bool(mallopt(param, value)) for param, value in settings])
