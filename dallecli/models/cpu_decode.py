"""`PriorTransformer.prefill` and `decode_step` for CPUs: each linear layer through oneDNN with its weight packed once.

A decode step multiplies a handful of rows (the batch) by every weight. PyTorch's default CPU path for that
(`F.linear` → the BLAS) is slow at so few rows: on the 2-core AVX-512 machine of docs/benchmarks.md, a
(4 × 512) @ (512 × 8192) product took 1.1 ms in fp32, and 65–120 µs through oneDNN with the weight packed
ahead into its blocked layout (bf16 / fp32). Packing costs one pass over the weights per `generate_codes`
call; a call decodes grid² − 1 steps.

Numerics follow the autocast the prior trains with: the residual stream and the layer norms in fp32, the
block's matrix products in `dtype` (bf16 or fp32), attention in fp32 (PyTorch's CPU attention kernels are
several times slower in bf16 at one query) over the cache, which is fp32, or bf16 for long streams
(`sample.cache_dtype`) and then widened as it is read (`wide_attention`: compiled where torch.compile runs),
and the image head in fp32 (§2.4: logits in fp32).
With dtype fp32 the logits equal `decode_step`'s to float rounding.

    decoder = CPUDecoder.create(model, torch.bfloat16, rows=B)  # None where oneDNN's linear is missing
    logits = decoder.prefill(cache, text)         # like model.prefill(cache, text)
    logits = decoder.step(cache, token)           # like model.decode_step(cache, token)
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from dallecli.console import info, warn
from dallecli.models.onednn import decode_linear, packed_linear_available
from dallecli.models.prior import KVCache, PriorTransformer, attend


class CPUDecoder:
    """The prompt, then one image token per call, as `PriorTransformer.prefill` and `decode_step`, with packed
    weights (module docstring)."""

    def __init__(self, model: PriorTransformer, dtype: torch.dtype, rows: int):
        self.model, self.dtype = model, dtype
        self.blocks = [(decode_linear(b.attn.c_attn, dtype, rows), decode_linear(b.attn.c_proj, dtype, rows),
                        decode_linear(b.mlp.c_fc, dtype, rows, gelu=True), decode_linear(b.mlp.c_proj, dtype, rows))
                       for b in model.blocks]
        self.head = decode_linear(model.image_head, torch.float32, rows)  # §2.4: logits in fp32
        # The layer norms' parameters, called through F.layer_norm: a module call costs microseconds of Python,
        # which at the `small` shape is several percent of a step.
        self.norms = [((b.ln_1.weight, b.ln_1.bias), (b.ln_2.weight, b.ln_2.bias)) for b in model.blocks]
        self.final_norm = (model.ln_f.weight, model.ln_f.bias)
        self.eps = model.ln_f.eps
        c = model.config
        index = torch.arange(c.image_len)
        # App. B.1: row + column embedding of every image position, summed once (a few ops fewer per token)
        self.image_pos = (model.image_row[index // c.grid] + model.image_col[index % c.grid]).detach().float()

    @classmethod
    def create(cls, model: PriorTransformer, dtype: torch.dtype, rows: int) -> CPUDecoder | None:
        """The decoder, or None where the packed linear is unavailable (the caller uses `decode_step`).
        Kept on the model for the next call while its weights are unchanged (their version counters), so a
        folder of batches packs once."""
        if not packed_linear_available() or next(model.parameters()).device.type != "cpu":
            return None
        key = (dtype, tuple(p._version for p in model.parameters()))
        held = model.__dict__.get("_cpu_decoder")  # not a submodule: kept out of state_dict and .to()
        if held is not None and held[0] == key:
            return held[1]
        try:
            decoder = cls(model, dtype, rows)
        except RuntimeError:  # e.g. a oneDNN build without bf16 support
            return None
        model.__dict__["_cpu_decoder"] = (key, decoder)
        return decoder

    @torch.no_grad()
    def prefill(self, cache: KVCache, text: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """`PriorTransformer.prefill` with the packed weights: text (B, text_len), image (B, n) or None →
        fp32 logits (B, n + 1, image_vocab). Attention as the model's under the sampler's autocast (`attend`);
        the products through oneDNN, without autocast's per-call weight casts (at the `small` shape those
        took half of a prefill's 4 ms, a tenth of a batch)."""
        m, c = self.model, self.model.config
        x = m.prefill_stream(cache, text, image).float()  # (B, t, d): the fp32 residual
        B, t, d = x.shape
        nh, norm = c.n_heads, (d,)
        bf16 = self.dtype == torch.bfloat16
        x = x.reshape(B * t, d)
        with torch.autocast("cpu", enabled=False):
            for i, ((qkv, proj, fc, fc_proj), (ln_1, ln_2), (k_cache, v_cache)) in enumerate(
                    zip(self.blocks, self.norms, cache.layers)):
                q, k, v = qkv(F.layer_norm(x, norm, *ln_1, self.eps)).view(B, t, 3, nh, d // nh).permute(
                    2, 0, 3, 1, 4)  # 3 × (B, nh, t, hs)
                k_cache.narrow(2, 0, t).copy_(k)
                v_cache.narrow(2, 0, t).copy_(v)
                keys, values = k_cache.narrow(2, 0, t), v_cache.narrow(2, 0, t)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # as the model under the sampler
                    y = attend(q.to(keys.dtype), keys, values, m._mask(i, 0, t), 0.0)
                x = x + proj(y.transpose(1, 2).reshape(B * t, d))
                x = x + fc_proj(fc(F.layer_norm(x, norm, *ln_2, self.eps)))
            cache.length = t
            h = F.layer_norm(x.view(B, t, d)[:, c.text_len:].reshape(-1, d), norm, *self.final_norm, self.eps)
            return self.head(h).view(B, t - c.text_len, -1)

    @torch.no_grad()
    def step(self, cache: KVCache, token: torch.Tensor) -> torch.Tensor:
        """Feed image token (B,) at position cache.length → fp32 logits (B, image_vocab) of the next one."""
        m, c = self.model, self.model.config
        start, index = cache.length, m._next_image_index(cache, "CPUDecoder's decode step")
        B, d, nh = token.size(0), c.d_model, c.n_heads
        norm = (d,)
        with torch.autocast("cpu", enabled=False):  # the dtypes are chosen here, not by an enclosing autocast
            x = F.embedding(token, m.image_embed.weight).float() + self.image_pos[index]  # (B, d): the fp32 residual
            for i, ((qkv, proj, fc, fc_proj), (ln_1, ln_2), (k_cache, v_cache)) in enumerate(
                    zip(self.blocks, self.norms, cache.layers)):
                q, k, v = qkv(F.layer_norm(x, norm, *ln_1, self.eps)).view(B, 3, nh, 1, d // nh).unbind(1)
                k_cache.narrow(2, start, 1).copy_(k)  # 3 × (B, nh, 1, hs)
                v_cache.narrow(2, start, 1).copy_(v)
                keys, values = k_cache.narrow(2, 0, start + 1), v_cache.narrow(2, 0, start + 1)
                if keys.dtype == torch.float32:
                    y = F.scaled_dot_product_attention(q.float(), keys, values, attn_mask=m._mask(i, start, 1))
                else:  # a bf16 cache (`sample.cache_dtype`)
                    y = wide_attention(q.float(), keys, values, m._mask(i, start, 1))
                x = x + proj(y.view(B, d))  # type promotion: the sum is fp32
                x = x + fc_proj(fc(F.layer_norm(x, norm, *ln_2, self.eps)))
            cache.length = start + 1
            return self.head(F.layer_norm(x, norm, *self.final_norm, self.eps))


def _wide_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q·kᵀ/√hs)·v in fp32 for one query per row: q (R, 1, hs) fp32; keys, values (R, T, hs) in bf16,
    widened to fp32 as they are read; mask (1, T) bool or None → (R, 1, hs) fp32. Compiled, it reads each
    bf16 key and value once; eager, it would make fp32 copies (`wide_attention` uses SDPA then). The softmax
    is written out so that its normalisation divides each output once, not every weight."""
    scores = (q * keys.float()).sum(-1, keepdim=True) * q.size(-1) ** -0.5  # (R, T, 1)
    if mask is not None:  # the query's own position is always visible: no row is all -inf
        scores = scores.masked_fill(~mask.view(1, -1, 1), float("-inf"))
    weights = torch.exp(scores - scores.amax(dim=1, keepdim=True))
    return (weights * values.float()).sum(1, keepdim=True) / weights.sum(1, keepdim=True)


_compiled: list = []  # [the compiled `_wide_attention`], or [None] once compiling it failed


def wide_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor:
    """Single-query attention over a bf16 K/V cache, computed in fp32 (as `_wide_attention` defines it).

    PyTorch's CPU attention is several times slower in bf16 than in fp32 at one query, and widening the cache
    first (`.float()`) writes and reads it again at twice the size: a `paper-stream` decode step spent half its
    time there. `_wide_attention` compiled by inductor (once per process, dynamic in the rows and the cache
    length; a few seconds, then cached on disk by inductor) reads each bf16 key and value once, in one fused
    kernel. Where torch.compile cannot run (no C++ compiler, TorchDynamo disabled), widen and call SDPA."""
    if not _compiled:
        # torch's C++ toolchain probe warns about CUDA_HOME on CUDA-less machines that have a CUDA folder
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        _compiled.append(torch.compile(_wide_attention, fullgraph=True)
                         if torch._dynamo.is_dynamo_supported() else None)
        if _compiled[0] is not None:
            info("compiling the decoder's attention over a bf16 cache (once per process, a few seconds)")
    B, nh, T, hs = keys.shape
    if _compiled[0] is not None:
        # Rows = (image, head) pairs, each computed whole by one thread: a row's result does not depend on
        # the batch it is in (an image regenerates alone). One row would be a graph of its own (size-1
        # dimensions are specialised), so a lone row is paired with a copy of itself.
        rows = [q.reshape(B * nh, 1, hs), keys.reshape(B * nh, T, hs), values.reshape(B * nh, T, hs)]
        if B * nh == 1:
            rows = [torch.cat([t, t]) for t in rows]
        # One graph for every row count and cache length; hs stays fixed (a static head size vectorises
        # without tail loops: 10–18% faster than all sizes symbolic at 770–1,280 positions).
        for t in rows:
            torch._dynamo.mark_dynamic(t, 0)
        for t in rows[1:] + ([mask] if mask is not None else []):
            torch._dynamo.mark_dynamic(t, 1)
        try:
            return _compiled[0](*rows, mask)[:B * nh].view(B, nh, 1, hs)
        except Exception as exc:  # e.g. inductor finds no C++ compiler: decode on without it
            _compiled[0] = None
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            warn(f"torch.compile failed for the decoder's attention ({type(exc).__name__}: {first}); "
                 "sampling goes on without it, slower on long streams")
    return F.scaled_dot_product_attention(q, keys.float(), values.float(), attn_mask=mask)
