"""Sampling (§2.6) with and without the KV cache: generated image tokens/s at the rival's shapes.

`generate_codes` from a caption to a full grid of codes, batch 4, temperature 1, no filtering, in the precision
`dalle sample` uses on this machine (`hardware.default_precision`: bf16 products on CPUs with native bf16, else fp32):
prefill of text + BOS, then one decode step per image token (cached: `CPUDecoder`, oneDNN with packed
weights; over a bf16 cache, attention compiled once per process: its time is in `warmup_s`), or a forward
over the whole prefix per token (`uncached=True`, the reference the cached decoder must equal). Only codes:
the dVAE decode to pixels is not timed (the rival's `generate_images` figure includes its VAE decode; at 8×8
codes that costs it little).

The uncached sampler at the paper stream needs ~1,000 forwards over up to 1,280 positions (the better part
of an hour on two cores), so it is extrapolated: one uncached step (forward over the prefix, fp32 head on
the last position, draw) is timed at image positions 0, n/2 and n−1 and the n steps are summed by
Simpson's rule (exact when a step's cost is quadratic in the prefix length, as attention makes it).
"""
from __future__ import annotations

import time

import torch

from benchmarks.common import (RIVAL, RIVAL_NAME, SHAPES, TARGET_SAMPLE_CACHED, TARGET_SAMPLE_VS_GENERATE, Result,
                               environment, fake_batch, measure, median, ratio, read_bandwidth)
from dallecli.models.prior import PriorTransformer
from dallecli.hardware import default_precision
from dallecli.sample import SamplingConfig, _draw, cache_dtype, generate_codes, uniform_noise


def _setup(shape_name: str):
    shape = SHAPES[shape_name]
    torch.manual_seed(0)
    model = PriorTransformer(shape.prior).eval()
    text, _ = fake_batch(shape.prior, shape.sample_batch, seed=1)
    seeds = list(range(shape.sample_batch))
    return shape, model, text, seeds


def sample(shape_name: str, cached: bool, reps: int, budget_s: float) -> Result:
    shape, model, text, seeds = _setup(shape_name)
    c, batch = shape.prior, shape.sample_batch
    env = environment()
    cfg = SamplingConfig()
    # Warm-up on the last 8 image tokens only (an image prompt holds the rest): the same code, less time.
    prompt = torch.randint(0, c.image_vocab, (batch, c.image_len - 8))
    precision = default_precision(on_gpu=False)
    tic = time.perf_counter()  # includes compiling the bf16-cache attention where the cache is bf16
    generate_codes(model, text, seeds, cfg, prompt=prompt, uncached=not cached, precision=precision)
    warmup_s = time.perf_counter() - tic
    times = measure(lambda: generate_codes(model, text, seeds, cfg, uncached=not cached, precision=precision),
                    warmup=0, reps=reps, budget_s=budget_s)
    seconds = median(times)
    tok_s = batch * c.image_len / seconds
    kv = cache_dtype(c, torch.bfloat16 if precision == "bf16" else torch.float32, torch.device("cpu"))
    bound = bandwidth_bound(model, batch, precision, kv) if cached else {}
    if bound:
        bound["fraction_of_bound"] = tok_s / bound["bound_tok_s"]
    return _result(shape, cached, tok_s, {**env, **bound, "precision": precision,
                                          "cache_dtype": str(kv).removeprefix("torch.") if cached else None,
                                          "s_per_batch": seconds, "s_per_batch_all": times,
                                          "warmup_s": warmup_s,
                                          "best_value": batch * c.image_len / min(times),
                                          "reps": len(times), "measured": "whole batches"})


def bandwidth_bound(model: PriorTransformer, batch: int, precision: str, kv: torch.dtype) -> dict:
    """Image tokens/s if each decode step only read the weights it multiplies by and the whole K/V cache once,
    as `CPUDecoder` holds them (block weights in bf16 or fp32, the image head in fp32, the cache in `kv`:
    `sample.cache_dtype`), at the read bandwidth measured now:
        bytes_j = s_w · P_blocks + 4 · P_head + 2 · L · B · (ℓ_j + 1) · d · s_kv    (ℓ_j = text_len + 1 + j)
    summed over the grid² − 1 decode steps. Below ~L3 size (the `small` shape's 16 MB) the weights stay in cache
    and the bound is loose: there the limit is per-operation overhead, not memory."""
    c = model.config
    s_w = 2 if precision == "bf16" else 4
    weights = s_w * sum(p.numel() for p in model.blocks.parameters()) + 4 * model.image_head.weight.numel()
    steps, first = c.image_len - 1, c.text_len + 2
    positions = steps * first + steps * (steps - 1) // 2
    s_kv = torch.finfo(kv).bits // 8
    total = steps * weights + 2 * c.n_layers * batch * c.d_model * s_kv * positions
    gbs = read_bandwidth()
    seconds = total / (gbs * 1e9)
    return {"read_bandwidth_gbs": gbs, "bytes_per_batch": total, "bound_tok_s": batch * c.image_len / seconds,
            "bound": f"weights ({precision} blocks, fp32 head) + K/V cache ({str(kv).removeprefix('torch.')}) "
                     "read once per decode step, "
                     "at the measured read bandwidth"}


def sample_uncached_extrapolated(shape_name: str) -> Result:
    """The uncached sampler's time for a whole batch, from three timed steps (Simpson's rule)."""
    shape, model, text, seeds = _setup(shape_name)
    c, batch = shape.prior, shape.sample_batch
    env = environment()
    cfg = SamplingConfig()
    seed_t = torch.tensor(seeds, dtype=torch.int64)
    codes = torch.randint(0, c.image_vocab, (batch, c.image_len))

    precision = default_precision(on_gpu=False)

    @torch.no_grad()
    def step(i):  # what generate_codes(uncached=True) does for image token i
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            h = model.run_blocks(model.embed_start(text, codes[:, :i]))
            logits = model._logits(model.image_head, h[:, -1])
        return _draw(logits, cfg, uniform_noise(seed_t, n)[:, i])

    n = c.image_len
    points = [0, n // 2, n - 1]
    step(points[0])  # warm-up
    per_step = {i: median(measure(lambda i=i: step(i), warmup=0, reps=1)) for i in points}
    f0, fm, f1 = (per_step[i] for i in points)
    seconds = (n / 6) * (f0 + 4 * fm + f1)
    tok_s = batch * n / seconds
    return _result(shape, False, tok_s, {**env, "precision": precision, "s_per_batch": seconds, "measured": (
        f"extrapolated: one step timed at image positions {points} ({', '.join(f'{per_step[i]:.3g} s' for i in points)}),"
        f" {n} steps summed by Simpson's rule"), "s_per_step_at": {str(i): per_step[i] for i in points}})


def _result(shape, cached: bool, tok_s: float, config: dict) -> Result:
    rival = RIVAL[shape.name]
    mode = "cached" if cached else "uncached"
    reference = rival["sample_cached_tok_s"] if cached else rival["sample_generate_images_tok_s"]
    r = ratio(tok_s, reference)
    what = "its KV cache passed directly" if cached else "its generate_images"
    extra = {}
    if cached:
        extra = {"target": f"≥ {TARGET_SAMPLE_CACHED:g}× the rival's cached sampler",
                 "meets_target": r >= TARGET_SAMPLE_CACHED,
                 "vs_rival_generate_images": tok_s / rival["sample_generate_images_tok_s"]}
        if shape.name == "paper-stream":
            extra["target_vs_generate_images"] = f"≥ {TARGET_SAMPLE_VS_GENERATE:g}×"
            extra["meets_target_vs_generate_images"] = extra["vs_rival_generate_images"] >= TARGET_SAMPLE_VS_GENERATE
    c = shape.prior
    return Result(
        name=f"sample_{mode}_{shape.name.replace('-', '_')}", value=tok_s, unit="img tok/s", reference=reference,
        ratio=r, shape={**shape.describe(), "batch": shape.sample_batch},
        config={**config, "vocab": {"text": c.text_vocab, "image": c.image_vocab}, "sampling": "temperature 1, no top-k/top-p, no guidance; codes only (no dVAE decode)",
                "s_per_image": c.image_len / tok_s,
                "reference_is": f"{RIVAL_NAME} {what} ({reference:,.4g} img tok/s)", **extra})


def with_speedup(cached: Result, uncached: Result) -> Result:
    """Record the cache's speed-up (cached ÷ uncached, same shape, same process) on the cached result."""
    cached.config["speedup_vs_uncached"] = cached.value / uncached.value
    return cached


# Uncached first: the cached line then carries the speed-up (`with_speedup`, applied by __main__).
BENCHMARKS = {
    "sample_uncached_small": lambda: sample("small", False, reps=3, budget_s=20),
    "sample_cached_small": lambda: sample("small", True, reps=5, budget_s=15),
    "sample_uncached_paper_stream": lambda: sample_uncached_extrapolated("paper-stream"),
    "sample_cached_paper_stream": lambda: sample("paper-stream", True, reps=3, budget_s=30),
}
