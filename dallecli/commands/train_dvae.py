"""`dalle train-dvae`: stage 1, the discrete VAE (§2.1, App. A)."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from dallecli.commands.common import DEFAULT_RUN, DebugOpt, TrainPrecision, QuietOpt, RunOpt


# Per preset: (steps, batch size per process, peak learning rate). `paper` is App. A.2's 3M updates of 512
# images on 64 GPUs at 1e-4. `tiny-vq` is sized to train in about four minutes on two idle CPU cores (bf16)
# and to reach ≥ 95% shapes-checker accuracy on its reconstructions (97–98% measured, see README); 10× the
# paper's learning rate, because a 775k-parameter model trained for 2,000 updates learns too slowly at 1e-4.
DEFAULTS = {"paper": (3_000_000, 8, 1e-4), "small": (20_000, 32, 1e-4), "small-vq": (20_000, 32, 1e-4),
            "tiny": (2000, 32, 1e-4), "tiny-vq": (2000, 32, 1e-3)}
# Without --preset, the shards' image size picks one. At 64 px it is tiny-vq, not the paper's gumbel dVAE
# (`tiny`): in a five-minute run the gumbel relaxation collapses onto a handful of codes (see PRESETS in
# dallecli/models/dvae.py). Shards of a size between (e.g. 320 px) take the preset below it: App. A.2's random
# crops and resizes then have room to work.
PRESET_FOR_SIZE = {64: "tiny-vq", 128: "small-vq", 256: "paper"}


class Preset(str, Enum):  # the keys of dallecli.models.dvae.PRESETS (a test keeps them equal)
    tiny = "tiny"
    tiny_vq = "tiny-vq"
    small = "small"
    small_vq = "small-vq"
    paper = "paper"


def preset_for_size(size: int) -> str | None:
    """The preset for shards of `size` px: made for that size, or for the largest size below it (random crops)."""
    fits = [s for s in PRESET_FOR_SIZE if s <= size]
    return PRESET_FOR_SIZE[max(fits)] if fits else None


def refuse_fresh_over_needed(out: Path) -> None:
    """--fresh replaces every checkpoint in `out` as the new run saves: refused while the run's codes or its prior
    still need one of them (`dvae_task.needed_steps`), since the prior could no longer sample."""
    from dallecli.console import UserError
    from dallecli.train.dvae_task import needed_steps

    needed = needed_steps(out)
    if needed:
        which = ", ".join(f"step {step} ({why})" for step, why in sorted(needed.items()))
        raise UserError(f"--fresh would replace {out}'s {which}; nothing was changed. Train the new dVAE beside "
                        f"it (--out {out.parent / 'dvae-2'}), or move the codes and the prior away first (then "
                        "`dalle encode` and `dalle train-prior` again)")


def command(
    run: RunOpt = DEFAULT_RUN,
    preset: Annotated[Optional[Preset], typer.Option(help="Model: tiny, tiny-vq (64 px), small, small-vq (128 px) or paper "
                                                     "(256 px). Default: by the shards' image size, 64 px tiny-vq (an EMA "
                                                     "vector quantiser: the paper's gumbel dVAE, `tiny`, collapses onto a few "
                                                     "codes in a five-minute run), 128 px small-vq, 256 px paper; larger "
                                                     "images take the preset below their size and are cropped at random "
                                                     "(App. A.2).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Total updates (default: per preset; a rerun: the run's own).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per process per update (default: per preset).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate, cosine to 1.25% of it (paper: 1e-4 → 1.25e-6; "
                                                   "default: per preset, 1e-3 for tiny-vq).")] = None,
    precision: Annotated[Optional[TrainPrecision], typer.Option(help="fp32, bf16 or fp16 (default: bf16 on a GPU and on a CPU with "
                                                                "native bf16 (AVX512-BF16 / AMX), else fp32).")] = None,
    beta_steps: Annotated[Optional[int], typer.Option(help="β warm-up length (paper 5,000; default min(5,000, 10% of --steps)).")] = None,
    tau_steps: Annotated[Optional[int], typer.Option(help="τ annealing length (paper 150,000; default min(150,000, 50% of --steps)).")] = None,
    save_every: Annotated[int, typer.Option(help="Save a checkpoint every N updates.")] = 500,
    eval_every: Annotated[int, typer.Option(help="Validate (MSE, PSNR, bits/dim, codebook use, a grid PNG) every N updates; 0: never.")] = 250,
    keep: Annotated[int, typer.Option(help="Keep the newest N checkpoints.")] = 3,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    workers: Annotated[int, typer.Option(help="Data-loader worker processes.")] = 0,
    max_errors: Annotated[int, typer.Option(help="Stop after this many unreadable samples in a row.")] = 100,
    fresh: Annotated[bool, typer.Option("--fresh", help="Start over instead of resuming from the latest checkpoint.")] = False,
    shards: Annotated[Optional[Path], typer.Option(help="Image shards (default RUN/shards).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Checkpoint folder (default RUN/dvae).")] = None,
    gpus: Annotated[int, typer.Option(help="Processes on this node (one per GPU), through Accelerate.")] = 1,
    nodes: Annotated[int, typer.Option(help="Number of nodes.")] = 1,
    node_rank: Annotated[int, typer.Option(help="This node's rank.")] = 0,
    main_address: Annotated[Optional[str], typer.Option(help="Address of node 0 (several nodes).")] = None,
    main_port: Annotated[int, typer.Option(help="Port of node 0.")] = 29500,
    cpu: Annotated[bool, typer.Option("--cpu", help="Use the CPU even where a GPU is present (with --gpus N: N CPU processes).")] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    from dallecli.commands.common import refuse_nonpositive, resumed_run, start

    start(quiet, debug)
    import os
    import sys

    from dallecli.config import RunDir
    from dallecli.console import UserError, info, warn
    from dallecli.hardware import default_precision
    from dallecli.models.dvae import PRESETS
    from dallecli.train.dvae_task import (DVAETask, check_image_size, collapse_warning, schedule_for,
                                          shard_image_size)
    from dallecli.train.launch import launched, maybe_relaunch
    from dallecli.train.loop import TrainConfig, train
    from dallecli.train.task import exit_code_for

    preset = getattr(preset, "value", preset)  # a Preset from the command line, a str from the demo
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown dVAE preset '{preset}'; choose one of {', '.join(PRESETS)}")
    refuse_nonpositive(steps=steps, batch_size=batch_size, lr=lr)
    if min(beta_steps or 0, tau_steps or 0) < 0:
        raise UserError(f"--beta-steps and --tau-steps must be at least 0 (got {beta_steps}, {tau_steps})")
    rd = RunDir(run)
    shards = shards or rd.shards
    out = out or rd.dvae
    if fresh and not launched():
        refuse_fresh_over_needed(out)
    resumed_model, resumed_train = resumed_run(out, "dvae", fresh)
    if preset is None and resumed_model:  # a rerun continues the run's own preset
        from dallecli.config import to_dict
        from dallecli.train.state import config_diff

        preset = next((p for p, c in PRESETS.items() if not config_diff(resumed_model, to_dict(c))), None)
    batch_size = resumed_train.get("batch_size") if batch_size is None else batch_size
    lr = resumed_train.get("lr") if lr is None else lr
    size = shard_image_size(shards)  # one image read: it picks the preset and is checked against it
    if preset is None:
        preset = preset_for_size(size)
        if preset is None:
            raise UserError(f"no dVAE preset is made for the {size} px images in {shards}; rebuild the shards with "
                            f"--size 64, 128 or 256, or pass --preset")
    config = PRESETS[preset]
    check_image_size(config, size, shards, preset)
    if size > config.image_size and not launched():
        info(f"the images in {shards} are {size} px: each is cropped and resized at random to the dVAE's "
             f"{config.image_size} px as it is read (App. A.2; {preset} preset)")
    default_steps, default_batch, default_lr = DEFAULTS.get(preset, (10_000, 32, 1e-4))
    steps = resumed_train.get("steps", default_steps) if steps is None else steps  # a rerun: the run's own
    if preset == "tiny" and steps <= 10_000 and not resumed_model and not launched():  # once, before --gpus N
        warn("the paper's gumbel dVAE at the `tiny` preset collapses onto a few codes in runs of a few thousand "
             "updates (4 of 512 codes in use after 2,000; docs/dvae-tiny-gumbel.md); `--preset tiny-vq` learns "
             "usable codes in minutes")
    maybe_relaunch(gpus, nodes, node_rank, main_address, main_port, cpu)  # after the input checks: fail in seconds
    lr = default_lr if lr is None else lr
    import torch

    on_gpu = torch.cuda.is_available() and not cpu
    if not on_gpu and preset == "paper" and not launched():  # 256 px shards, build-shards' default size
        warn(f"the paper dVAE ({size} px shards → the `paper` preset, 97.6M parameters, {steps:,} steps) takes "
             "many seconds a step on a CPU; for a CPU run, rebuild the shards with --size 64 (the tiny-vq preset "
             "trains in minutes) or 128")
    cfg = TrainConfig(
        steps=steps, batch_size=default_batch if batch_size is None else batch_size, lr=lr, min_lr=1.25e-6 * lr / 1e-4,
        decay_steps=min(1_200_000, steps), schedule="cosine",
        betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4,  # App. A.2
        ema_decay=0.999, precision=(precision.value if precision else default_precision(on_gpu)),
        save_every=save_every, eval_every=eval_every, keep=keep, seed=seed, workers=workers,
        max_errors=max_errors)
    task = DVAETask(config=config, shards=shards, schedule=schedule_for(steps, beta_steps, tau_steps),
                    batch_size=cfg.batch_size, seed=seed, workers=workers, out=out)
    result = train(task, cfg, out, fresh=fresh, cpu=cpu)
    collapsed = collapse_warning(result.metrics, config)
    if collapsed and os.environ.get("RANK", "0") == "0":
        warn(collapsed)
    code = exit_code_for(result)
    if code:
        sys.exit(code)
