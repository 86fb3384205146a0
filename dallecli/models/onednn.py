"""Linear layers on the CPU through oneDNN (the MKL-DNN kernels PyTorch ships), in training and in decoding.

PyTorch sends fp32 matrix products on the CPU to the BLAS (MKL). On AMD CPUs MKL runs its AVX2 code, where
oneDNN uses AVX-512: on the 2-core benchmark machine a 1024³ fp32 product ran at 213 GFLOP/s through
`torch.mm` and 495 through oneDNN, with the same fp32 accumulation (docs/benchmarks.md). On Intel CPUs MKL
runs its AVX-512 code and trains the prior faster than oneDNN does (`small` 9.3k against 7.4k tok/s,
`paper-stream` 1,000 against 860, on a 2-core Xeon). bf16 products go through oneDNN already. Two uses:

- `Linear`, an `nn.Linear` whose fp32 CPU forward and backward (both gradients) run through oneDNN on
  non-Intel CPUs: the prior's layers. The parameters and the state dict are nn.Linear's; elsewhere (GPU,
  autocast, Intel CPUs) it is nn.Linear.
- `PackedLinear`, a weight packed once into oneDNN's blocked layout for inference (`CPUDecoder`): at a few
  rows the unpacked products spend most of their time on the layout. `decode_linear` picks it or, for small
  fp32 weights on Intel CPUs, `BLASLinear` (MKL on a weight transposed once).

Both use `torch.ops.mkldnn._linear_pointwise` and `_reorder_linear_weight`, the ops inductor's CPU backend
emits; where this torch lacks them, everything falls back to `F.linear`.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from dallecli.hardware import cpu_is_intel


@functools.cache
def packed_linear_available() -> bool:
    """Whether this torch has oneDNN's linear ops (a CPU build with MKL-DNN, as PyTorch's wheels are)."""
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return (torch.backends.mkldnn.is_available() and ops is not None
                and hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight"))
    except (AttributeError, RuntimeError):
        return False


def _matmul_t(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (n, k) · weight (m, k)ᵀ + bias through oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x·Wᵀ + b with its two gradients, each one oneDNN product (ḡx = g·W, ḡW = gᵀ·x)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _matmul_t(x.reshape(-1, x.size(-1)), weight, bias).view(*x.shape[:-1], weight.size(0))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.size(-1))  # (n, out)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _matmul_t(g, weight.t()).view(x.shape)  # (n, out)·(out, in)
        if ctx.needs_input_grad[1]:
            gw = _matmul_t(g.t(), x.reshape(-1, x.size(-1)).t())  # (out, n)·(n, in), on transposed views
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, through oneDNN for fp32 CPU tensors outside autocast on CPUs where MKL is slow (not Intel).
    Under torch.compile it stays `F.linear`: inductor packs the weights for oneDNN itself (and cannot trace
    the availability check)."""
    if (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.numel()
            and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled("cpu") and packed_linear_available() and not cpu_is_intel()):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose fp32 CPU products run through oneDNN (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class PackedLinear:
    """y = x·Wᵀ + b through oneDNN, W packed once in `dtype`; `gelu` fuses the exact (erf) GELU after it."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, rows: int, gelu: bool = False):
        weight = linear.weight.detach().to(dtype).contiguous()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, rows)  # oneDNN's blocked layout
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        self.attr, self.algorithm = ("gelu", "none") if gelu else ("none", "")
        self.dtype = dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (rows, in) in any float dtype → (rows, out) in `dtype`."""
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.weight, self.bias, self.attr, [],
                                                  self.algorithm)


class BLASLinear:
    """y = x·Wᵀ + b through the BLAS (MKL) on Wᵀ stored contiguous once (`F.linear` transposes at every call);
    `gelu` applies the exact (erf) GELU after it. fp32 only."""

    def __init__(self, linear: nn.Linear, gelu: bool = False):
        self.weight_t = linear.weight.detach().float().t().contiguous()  # (in, out)
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        self.gelu = gelu

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (rows, in) → (rows, out) fp32."""
        x = x.float()
        y = x @ self.weight_t if self.bias is None else torch.addmm(self.bias, x, self.weight_t)
        return F.gelu(y) if self.gelu else y


# Below this many weight elements (1 MB in fp32), an fp32 product at a few rows takes a few microseconds of
# arithmetic, and oneDNN's fixed cost per call (~20–30 µs on a 2-core Xeon) exceeds MKL's several times over:
# there the `small` shape sampled 15–20% faster through MKL; above it the two were level, or oneDNN ahead
# (`paper-stream`, docs/benchmarks.md).
BLAS_MAX_WEIGHT = 1 << 18


def decode_linear(linear: nn.Linear, dtype: torch.dtype, rows: int, gelu: bool = False) -> PackedLinear | BLASLinear:
    """The faster product for a decode step of `rows` rows: `BLASLinear` for small fp32 weights on Intel CPUs
    (where MKL runs its AVX-512 code), else `PackedLinear`. The choice depends on the CPU and the shape only,
    never on timings: the same machine always draws the same images."""
    if dtype == torch.float32 and cpu_is_intel() and linear.weight.numel() <= BLAS_MAX_WEIGHT:
        return BLASLinear(linear, gelu)
    return PackedLinear(linear, dtype, rows, gelu)
