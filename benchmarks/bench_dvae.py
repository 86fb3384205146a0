"""dVAE training step and encode (images/s, FLOP utilisation) against the rival's DiscreteVAE.

The rival's dVAE (3 down-samplings, 512 codes, hidden 64) and ours differ in architecture; the comparison is
at the same job: batch 16, 64 px (or 256 px) RGB → an 8×8 (32×32) grid of 512 codes. Ours is the `tiny`
preset (4 groups of 1 resblock, widths 32…256, 3 max-pools), at its 64 px and at 256 px.
One training step: `elbo_loss` (gumbel relaxation at τ = 1, β = 6.6), backward, fused AdamW step
(`train.schedule.adamw`), zero_grad, on channels-last activations, as `dalle train-dvae` runs it.
Encode: `DVAE.encode` (argmax of the logits), no grad. FLOPs are counted by torch's FlopCounterMode on the
same call; utilisation = achieved FLOP/s ÷ the fp32 GEMM rate measured just before.
The `_bf16` variants run what `dalle train-dvae` / `dalle encode` run by default on a CPU with native bf16: the
`tiny-vq` preset (Gaussian likelihood) under bf16 autocast; their utilisation
is against the bf16 GEMM rate. `dvae_*_paper`: the `paper` preset (256 px, batch 2) in the commands' default
precision on this CPU (`hardware.default_precision`), against the rival's 256 px figure.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import (RIVAL, RIVAL_NAME, TARGET_TRAIN, Result, environment, gemm_ceiling, gemm_rate, measure,
                               median, ratio)
from dallecli.hardware import default_precision
from dallecli.models.dvae import DVAE, PRESETS, count_parameters
from dallecli.models.dvae_objective import elbo_loss
from dallecli.train.schedule import adamw

BATCH = 16


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def dvae(mode: str, size: int, reps: int, budget_s: float, precision: str = "fp32", preset: str | None = None,
         batch: int = BATCH) -> Result:
    """One benchmark; `preset` None: `tiny` (fp32) or `tiny-vq` (bf16) at `size`, else that preset at its size."""
    bf16 = precision == "bf16"
    preset = preset or ("tiny-vq" if bf16 else "tiny")
    config = replace(PRESETS[preset], image_size=size)
    env = environment()
    dtype = torch.bfloat16 if bf16 else torch.float32
    peak = gemm_rate(dtype)
    torch.manual_seed(0)
    model = DVAE(config)
    x = torch.rand(batch, 3, size, size)
    # channels-last activations in every variant, as `dalle train-dvae` and `dalle encode` run
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    kwargs = {"likelihood": config.likelihood, "sigma": config.gaussian_sigma}
    if mode == "train":
        model.train()
        optimizer = adamw([{"params": list(model.parameters()), "weight_decay": 1e-4}], lr=1e-4)

        def fn():
            with autocast():
                loss, _ = elbo_loss(model, x, tau=1.0, beta=6.6, **kwargs)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def counted():
            with autocast():
                loss = elbo_loss(model, x, tau=1.0, beta=6.6, **kwargs)[0]
            loss.backward()
            optimizer.zero_grad(set_to_none=True)
    else:
        model.eval()

        def fn():
            with torch.no_grad(), autocast():
                return model.encode(x)

        counted = fn
    flops = count_flops(counted)
    times = measure(fn, warmup=1, reps=reps, budget_s=budget_s)
    peak, gemms = gemm_ceiling(peak, dtype)
    seconds = median(times)
    img_s = batch / seconds
    rival = RIVAL[f"dvae_{size}"][f"{mode}_img_s"]
    r = ratio(img_s, rival)
    extra = {}
    if mode == "train" and preset.startswith("tiny"):  # the paper's 97.6M-parameter dVAE is no match for the rival's
        extra = {"target": f"≥ {TARGET_TRAIN:g}× the rival (step ≤ 0.5× its time)",
                 "meets_target": r >= TARGET_TRAIN}
    if preset.startswith("tiny"):
        name = "dvae_{}_tiny".format(mode) + ("" if size == 64 else f"_{size}") + ("_bf16" if bf16 else "")
    else:
        name = f"dvae_{mode}_{preset}"
    return Result(
        name=name, value=img_s, unit="img/s", reference=rival, ratio=r,
        shape={"preset": preset, "image_size": size, "grid": config.grid, "codes": config.vocab_size,
               "n_hid": config.n_hid, "blocks_per_group": config.n_blk_per_group, "batch": batch},
        config={**env, "precision": precision, "channels_last": True, "params": count_parameters(model), "s_per_batch": seconds,
                "s_per_batch_all": times, "best_value": batch / min(times), "reps": len(times), "flops_per_image": flops / batch,
                "flop_count": "torch.utils.flop_counter.FlopCounterMode" + (" (forward + backward)" if mode == "train" else ""),
                "achieved_gflops": flops / seconds / 1e9, "gemm_gflops": peak, **gemms,
                "utilisation": flops / seconds / (peak * 1e9),
                "reference_is": f"{RIVAL_NAME} DiscreteVAE ({rival:,.4g} img/s; another architecture, same job)",
                **extra})


BENCHMARKS = {
    "dvae_train_tiny": lambda: dvae("train", 64, reps=7, budget_s=15),
    "dvae_encode_tiny": lambda: dvae("encode", 64, reps=7, budget_s=10),
    "dvae_train_tiny_256": lambda: dvae("train", 256, reps=3, budget_s=20),
    "dvae_encode_tiny_256": lambda: dvae("encode", 256, reps=5, budget_s=15),
    "dvae_train_tiny_bf16": lambda: dvae("train", 64, reps=7, budget_s=15, precision="bf16"),
    "dvae_encode_tiny_bf16": lambda: dvae("encode", 64, reps=7, budget_s=10, precision="bf16"),
    # The paper's dVAE (256 px → 32×32 × 8192 codes, 97.6M parameters) in what the commands run on this CPU;
    # batch 2: its training step is ~10 s here.
    "dvae_train_paper": lambda: dvae("train", 256, reps=2, budget_s=30, precision=default_precision(False),
                                     preset="paper", batch=2),
    "dvae_encode_paper": lambda: dvae("encode", 256, reps=3, budget_s=15, precision=default_precision(False),
                                      preset="paper", batch=2),
}
