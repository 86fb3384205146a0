"""The reference every utilisation figure divides by: fp32 (and bf16) GEMM GFLOP/s on this machine, now.

An (n, n) @ (n, n) product costs 2·n³ FLOPs; median of 7 after 2 warm-ups, torch's default threads; the
faster of `torch.mm` and oneDNN's linear (`benchmarks.common.gemm_rates`; both in config). On an AMD CPU
`torch.mm` in fp32 runs MKL's AVX2 code and oneDNN's AVX-512 kernels can be more than twice as fast; the
prior's linear layers use oneDNN on the CPU (`dallecli.models.onednn`). `matmul_small` (n = 256) is the
quick one the smoke test runs.
"""
from __future__ import annotations

import torch

from benchmarks.common import Result, environment, fastest, gemm_rates


def matmul(n: int = 1024) -> Result:
    env = environment()
    fp32, bf16 = gemm_rates(torch.float32, n), gemm_rates(torch.bfloat16, n)
    best = {"fp32": fastest(fp32), "bf16": fastest(bf16)}
    return Result(name="matmul" if n == 1024 else "matmul_small", value=best["fp32"], unit="GFLOP/s",
                  reference=None, ratio=None, shape={"m": n, "n": n, "k": n, "dtype": "fp32"},
                  config={**env, "bf16_gflops": best["bf16"], "bf16_vs_fp32": best["bf16"] / best["fp32"],
                          "fp32_by": fp32, "bf16_by": bf16, "flops": "2·n³ per product",
                          "reference_is": "none: this is the reference of the utilisation figures"})


BENCHMARKS = {
    "matmul": matmul,
    "matmul_small": lambda: matmul(256),
}
