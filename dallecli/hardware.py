"""What this machine does fast: native bf16 on the CPU, the GPU's measured matmul rate, the default precision."""
from __future__ import annotations

import functools
import time
from pathlib import Path

import torch


@functools.cache
def _cpuinfo() -> str:
    """/proc/cpuinfo, read once per process ("" where there is none)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX): there bf16 autocast trains the
    transformer about twice as fast as fp32 (docs/benchmarks.md)."""
    flags = _cpuinfo()
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache  # asked by every fp32 linear call on the CPU: answered once
def cpu_is_intel() -> bool:
    """Whether the CPU is an Intel one, where MKL runs its AVX-512 code (it runs its AVX2 code on others)."""
    return "GenuineIntel" in _cpuinfo()


def default_precision(on_gpu: bool) -> str:
    """The precision of every command when --precision is not given: bf16 on a GPU, and on a CPU with native
    bf16 arithmetic (AVX512-BF16 / AMX), where autocast makes the tiny models' training steps 1.8–2.2× faster
    than fp32 and trains them as well, and sampling and encoding faster too; fp32 on other CPUs, where bf16
    is emulated and slow."""
    return "bf16" if on_gpu or cpu_has_bf16() else "fp32"


_PEAK: dict[str, float] = {}


def matmul_peak(device: torch.device) -> float | None:
    """This GPU's bf16 matrix-multiply rate in FLOP/s, measured once per process (a 4096³ product, ~0.2 s):
    the denominator of the MFU a GPU run reports (the card's own rate, not a datasheet's). None on a CPU."""
    if device.type != "cuda":
        return None
    key = str(device)
    if key not in _PEAK:
        a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ a
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(10):
            a @ a
        torch.cuda.synchronize(device)
        _PEAK[key] = 10 * 2 * 4096**3 / (time.perf_counter() - t)
    return _PEAK[key]


def model_flops_utilisation(rate: float, flops_per_unit: float, processes: int, peak: float) -> float:
    """MFU: the model's FLOPs per second per process (rate counts every process's units) over the peak."""
    return rate * flops_per_unit / (processes * peak)
