"""The reference every utilisation figure divides by: fp32 (and bf16) GEMM GFLOP/s on this machine, now.

An (n, n) @ (n, n) product costs 2·n³ FLOPs; median of 7 after 2 warm-ups, torch's default threads.
`matmul_small` (n = 256) is the quick one the smoke test runs.

The value is `torch.mm` in fp32, the BLAS (MKL) that fp32 training's linear layers run on. The config also
records oneDNN's fp32 rate for the same product (its packed linear, what `CPUDecoder` uses): on an AMD CPU
MKL takes its AVX2 path, and oneDNN's AVX-512 kernels can be more than twice as fast.
"""
from __future__ import annotations

import torch

from benchmarks.common import Result, environment, gemm_rate, measure, median


def onednn_rate(n: int) -> float | None:
    """fp32 GFLOP/s of oneDNN's packed linear on an (n, n) @ (n, n) product; None where it is unavailable."""
    from dallecli.models.cpu_decode import packed_linear_available

    if not packed_linear_available():
        return None
    a, w = torch.randn(n, n), torch.randn(n, n)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, n)
    times = measure(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""),
                    warmup=2, reps=7, budget_s=10)
    return 2 * n**3 / median(times) / 1e9


def matmul(n: int = 1024) -> Result:
    env = environment()
    fp32 = gemm_rate(torch.float32, n)
    bf16 = gemm_rate(torch.bfloat16, n)
    onednn = onednn_rate(n)
    return Result(name="matmul" if n == 1024 else "matmul_small", value=fp32, unit="GFLOP/s", reference=None,
                  ratio=None, shape={"m": n, "n": n, "k": n, "dtype": "fp32"},
                  config={**env, "bf16_gflops": bf16, "bf16_vs_fp32": bf16 / fp32, "flops": "2·n³ per product",
                          "fp32_onednn_gflops": onednn, "onednn_vs_torch_mm": onednn / fp32 if onednn else None,
                          "reference_is": "none: this is the reference of the utilisation figures (torch.mm)"})


BENCHMARKS = {
    "matmul": matmul,
    "matmul_small": lambda: matmul(256),
}
