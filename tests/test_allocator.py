"""`allocator.keep_freed_memory`: freed tensor memory is reused without new page faults."""
import os
import platform
import subprocess
import sys

import pytest

# Frees and reallocates 82 MB of tensors per round (one above glibc's largest mmap threshold), as a training
# step frees and reallocates its activations;
# prints the page faults per round once the heap has grown.
SCRIPT = """
import resource, sys, torch
from dallecli.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():
    tensors = [torch.ones(n << 20, dtype=torch.uint8) for n in (1, 4, 2, 8, 3, 64)]
    del tensors
for _ in range(6):
    step()
before = faults()
for _ in range(5):
    step()
print(applied, (faults() - before) / 5)
"""


def run(mode: str, script: str = SCRIPT) -> tuple[str, float]:
    """The script's two printed values, run in a process without the user's malloc settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, env=env, check=True)
    applied, value = out.stdout.split()
    return applied, float(value)


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's malloc only")
def test_freed_memory_is_reused_without_page_faults():
    applied, faults = run("keep")
    assert applied == "True"
    assert faults < 0.01 * (82 << 20) / 4096  # under 1% of the pages each round touches


# Frees 20 small blocks of each of a few sizes (beyond the 7 per size the per-thread cache keeps) and prints the
# bytes left in fastbins (mallinfo2().fsmblks), which keep_freed_memory turns off.
FASTBINS = """
import ctypes, sys
from dallecli.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(size) for size in (24, 40, 72, 120) for _ in range(20)]
for block in blocks:
    libc.free(block)
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc.mallinfo2.restype = MallInfo2
print(applied, libc.mallinfo2().fsmblks)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc"
                    or tuple(map(int, platform.libc_ver()[1].split(".")[:2])) < (2, 33),
                    reason="glibc's malloc only (mallinfo2: glibc 2.33 and later)")
def test_small_freed_blocks_skip_the_fastbins():
    assert run("default", FASTBINS)[1] > 0  # glibc's own policy parks them in fastbins
    assert run("keep", FASTBINS) == ("True", 0.0)


def test_left_alone_where_the_user_tunes_malloc(monkeypatch):
    from dallecli import allocator

    allocator.keep_freed_memory.cache_clear()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    try:
        assert allocator.keep_freed_memory() is False
    finally:
        allocator.keep_freed_memory.cache_clear()
