"""Prior training step (tokens/s, model-FLOPs utilisation) at the rival's `small` and `paper-stream` shapes.

One step is what train/loop.py does per batch: forward, `prior_loss` (§2.2's 1/8 text + 7/8 image), backward,
fused AdamW step over `param_groups` (`train.schedule.adamw`), zero_grad. In fp32 (the rival's precision, and the CPU default where the CPU has
no native bf16) the linear layers run through oneDNN on non-Intel CPUs and MKL on Intel ones (`dallecli.models.onednn`); the `_bf16` variants run the
same step under bf16 autocast, what `train-prior` does by default on CPUs with native bf16.
MFU = tokens/s × flops_per_token (6·N + 12·L·d·T, dallecli.models.prior.flops_per_token) ÷ the GEMM rate
measured just before, in the same dtype.
"""
from __future__ import annotations

import contextlib

import torch

from benchmarks.common import (RIVAL, RIVAL_NAME, SHAPES, TARGET_TRAIN, Result, environment, fake_batch,
                               gemm_ceiling, gemm_rate, measure, median, memory_gb, ratio)
from dallecli.models.prior import PriorTransformer, flops_per_token, num_params, param_groups, prior_loss
from dallecli.train.schedule import adamw


def train_step_fn(model: PriorTransformer, text: torch.Tensor, image: torch.Tensor, dtype: torch.dtype | None):
    """A closure running one full training step (what train/loop.py does per batch, without its bookkeeping)."""
    optimizer = adamw(param_groups(model, 0.01), lr=1e-4)  # fused, as train/loop.py builds it
    autocast = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype is not None else contextlib.nullcontext
    pad = model.config.pad_id

    def step():
        with autocast():
            text_logits, image_logits = model(text, image)
            loss, _ = prior_loss(text_logits, image_logits, text, image, pad)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def prior_train(shape_name: str, precision: str = "fp32", reps: int = 5, budget_s: float = 60.0) -> Result:
    shape = SHAPES[shape_name]
    c, batch = shape.prior, shape.train_batch
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    env = environment()
    peak = gemm_rate(dtype or torch.float32)
    torch.manual_seed(0)
    model = PriorTransformer(c).train()
    text, image = fake_batch(c, batch)
    times = measure(train_step_fn(model, text, image, dtype), warmup=1, reps=reps, budget_s=budget_s)
    peak, gemms = gemm_ceiling(peak, dtype or torch.float32)
    seconds = median(times)
    tokens = batch * c.seq_len
    tok_s = tokens / seconds
    flops = flops_per_token(c)
    rival = RIVAL[shape_name]["train_tok_s"]
    r = ratio(tok_s, rival)
    suffix = "" if precision == "fp32" else f"_{precision}"
    return Result(
        name=f"prior_train_{shape_name.replace('-', '_')}{suffix}", value=tok_s, unit="tok/s", reference=rival,
        ratio=r, shape={**shape.describe(), "batch": batch, "tokens_per_step": tokens},
        config={**env, "vocab": {"text": c.text_vocab, "image": c.image_vocab}, "precision": precision, "params": num_params(model), "s_per_step": seconds,
                "s_per_step_all": times, "best_value": tokens / min(times), "reps": len(times), "flops_per_token": flops,
                "flop_formula": "6·N + 12·L·d·T per token (dallecli.models.prior.flops_per_token)",
                "achieved_gflops": tok_s * flops / 1e9, "gemm_gflops": peak, **gemms, "gemm_dtype": precision,
                "utilisation": tok_s * flops / (peak * 1e9),
                "reference_is": f"{RIVAL_NAME} ({rival:,.0f} tok/s, fp32)",
                "rival_s_per_step": RIVAL[shape_name]["train_s_step"],
                "target": f"≥ {TARGET_TRAIN:g}× the rival (step ≤ 0.5× its time)",
                "meets_target": r >= TARGET_TRAIN, **memory_gb()})


BENCHMARKS = {
    "prior_train_small": lambda: prior_train("small", reps=7, budget_s=20),
    "prior_train_paper_stream": lambda: prior_train("paper-stream", reps=3, budget_s=45),
    "prior_train_small_bf16": lambda: prior_train("small", "bf16", reps=7, budget_s=20),
    "prior_train_paper_stream_bf16": lambda: prior_train("paper-stream", "bf16", reps=3, budget_s=30),
}
