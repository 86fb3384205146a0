"""The reference every utilisation figure divides by: fp32 (and bf16) GEMM GFLOP/s on this machine, now.

An (n, n) @ (n, n) product costs 2·n³ FLOPs; median of 7 after 2 warm-ups, torch's default threads.
`matmul_small` (n = 256) is the quick one the smoke test runs.
"""
from __future__ import annotations

import torch

from benchmarks.common import Result, environment, gemm_rate


def matmul(n: int = 1024) -> Result:
    env = environment()
    fp32 = gemm_rate(torch.float32, n)
    bf16 = gemm_rate(torch.bfloat16, n)
    return Result(name="matmul" if n == 1024 else "matmul_small", value=fp32, unit="GFLOP/s", reference=None,
                  ratio=None, shape={"m": n, "n": n, "k": n, "dtype": "fp32"},
                  config={**env, "bf16_gflops": bf16, "bf16_vs_fp32": bf16 / fp32, "flops": "2·n³ per product",
                          "reference_is": "none: this is the reference of the utilisation figures"})


BENCHMARKS = {
    "matmul": matmul,
    "matmul_small": lambda: matmul(256),
}
