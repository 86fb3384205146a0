"""The benchmark suite: `python -m benchmarks [NAME ...] [--json]` (see docs/benchmarks.md).

Each bench_*.py module holds a `BENCHMARKS` dict of name → zero-argument function returning a
`benchmarks.common.Result`; `registry()` collects them in suite order. Imports are lazy so that
`--list` and a single benchmark start quickly.
"""
from __future__ import annotations

import importlib
from typing import Callable

# Suite order: the matmul reference first, then the pipeline in the order a run uses it.
MODULES = ("bench_matmul", "bench_data", "bench_dvae", "bench_prior", "bench_sample", "bench_rerank", "bench_eval")
NOT_IN_SUITE = {"matmul_small"}  # the smoke test's quick one; run it by name


def registry() -> dict[str, Callable]:
    out: dict[str, Callable] = {}
    for module in MODULES:
        out.update(importlib.import_module(f"benchmarks.{module}").BENCHMARKS)
    return out
