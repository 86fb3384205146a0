"""The C library's memory allocator, set up so that CPU training steps stay off the kernel's page-fault path.

Imports nothing heavy: every `dalle` command calls `keep_freed_memory` at start-up, `--help` included."""
from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_LARGEST_MMAP_THRESHOLD = 32 << 20  # glibc refuses more on 64-bit systems
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory that tensors free for the next ones instead of handing it back to
    the kernel. True where applied; once per process.

    By default glibc serves each allocation above a threshold (128 kB, raised as large blocks are freed) with a
    fresh mmap, and returns freed memory at the heap's top to the kernel. A training step frees and reallocates
    the same activations every step, so each step faulted their pages in again, zero-filled by the kernel:
    7,800 page faults (31 MB) per `tiny-vq` dVAE step, ~17% of its time on the 2-core benchmark machine, and
    22% of the fp32 `tiny` step's (docs/benchmarks.md). Here blocks up to 32 MB come from the heap, and the
    heap is trimmed only above 2 GB free at its top: the process keeps its peak heap, as PyTorch's caching
    allocator does on a GPU. Left alone where the user tunes malloc through the environment, and on other C
    libraries."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _LARGEST_MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
