"""`dalle train-prior`: stage 2, the transformer over caption tokens and image codes (§2.2, App. B)."""
from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from dallecli.commands.common import DEFAULT_RUN, DebugOpt, TrainPrecision, QuietOpt, RunOpt


class Attention(str, Enum):
    dense = "dense"
    paper = "paper"


class Preset(str, Enum):  # the keys of dallecli.models.prior.PRESETS (a test keeps them equal)
    tiny = "tiny"
    small = "small"
    base = "base"
    paper = "paper"


class Schedule(str, Enum):
    plateau = "plateau"
    cosine = "cosine"


# Per preset: (steps, batch size per process, peak lr, warm-up). `paper` is App. B's 430,000 updates of
# 1,024 captions (8 per GPU on 128 GPUs) at 4.5e-4 after 5,000 warm-up updates. `small` (the default) is sized
# for two CPU cores: 2,200 updates are about seven minutes in bf16, and with the default dVAE and CLIP the
# three commands train in about a quarter of an hour (README, "What the CPU presets reach").
DEFAULTS = {"tiny": (3000, 32, 1e-3, 100), "small": (2200, 32, 1e-3, 100), "base": (100_000, 8, 4.5e-4, 2000),
            "paper": (430_000, 8, 4.5e-4, 5000)}
# The paper's halve-on-plateau schedule needs a run long enough to have plateaus; runs of minutes anneal
# with a cosine instead.
SHORT_RUN_PRESETS = ("tiny", "small")


def command(
    run: RunOpt = DEFAULT_RUN,
    preset: Annotated[Optional[Preset], typer.Option(help="Model size: tiny (tests), small (CPU: d 256, 4 layers), base (one GPU) or paper. Default: small, or the run's own when continuing it.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Total updates (default: per preset; a rerun: the run's own).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Captions per process per micro-batch (default: per preset).")] = None,
    global_batch: Annotated[Optional[int], typer.Option(help="Accumulate gradients up to this global batch (paper: 1024).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (paper 4.5e-4).")] = None,
    warmup: Annotated[Optional[int], typer.Option(help="Linear warm-up updates (paper 5,000).")] = None,
    schedule: Annotated[Optional[Schedule], typer.Option(help="plateau: halve on a val-loss plateau, 5 times (paper; default for base and paper); cosine: to 0 (default for tiny and small).")] = None,
    precision: Annotated[Optional[TrainPrecision], typer.Option(help="bf16 (default on a GPU and on CPUs with native bf16), fp32 (other CPUs), fp16 with per-resblock gradient scaling (§2.4).")] = None,
    attention: Annotated[Optional[Attention], typer.Option(help="dense causal (fused kernels) or the paper's row/column/conv masks.")] = None,
    text_len: Annotated[Optional[int], typer.Option(help="Caption tokens (paper 256; default per preset).")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Residual/attention dropout (not stated in the paper).")] = None,
    checkpoint_activations: Annotated[Optional[bool], typer.Option("--checkpoint-activations/--no-checkpoint-activations", help="Recompute blocks in backward to save memory.")] = None,
    bpe_dropout: Annotated[Optional[float], typer.Option(help="BPE-dropout rate on captions (default 0.1, the paper's).", show_default=False)] = None,
    cond_drop: Annotated[Optional[float], typer.Option(help="Drop the caption with this probability, for classifier-free guidance when sampling (default 0.1).", show_default=False)] = None,
    ema_decay: Annotated[Optional[float], typer.Option(help="EMA decay of the weights (default 0.99, the paper's).", show_default=False)] = None,
    save_every: Annotated[int, typer.Option(help="Save a checkpoint every N updates.")] = 500,
    eval_every: Annotated[int, typer.Option(help="Validation loss (text and image) every N updates; 0: never.")] = 250,
    keep: Annotated[int, typer.Option(help="Keep the newest N checkpoints.")] = 3,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (default 0).", show_default=False)] = None,
    workers: Annotated[int, typer.Option(help="Data-loader worker processes.")] = 0,
    max_errors: Annotated[int, typer.Option(help="Stop after this many unreadable samples in a row.")] = 100,
    fresh: Annotated[bool, typer.Option("--fresh", help="Start over instead of resuming from the latest checkpoint.")] = False,
    codes: Annotated[Optional[Path], typer.Option(help="Code shards (default RUN/codes).")] = None,
    tokenizer: Annotated[Optional[Path], typer.Option(help="Tokenizer folder (default RUN/tokenizer).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Checkpoint folder (default RUN/prior).")] = None,
    gpus: Annotated[int, typer.Option(help="Processes on this node (one per GPU), through Accelerate.")] = 1,
    nodes: Annotated[int, typer.Option(help="Number of nodes.")] = 1,
    node_rank: Annotated[int, typer.Option(help="This node's rank.")] = 0,
    main_address: Annotated[Optional[str], typer.Option(help="Address of node 0 (several nodes).")] = None,
    main_port: Annotated[int, typer.Option(help="Port of node 0.")] = 29500,
    cpu: Annotated[bool, typer.Option("--cpu", help="Use the CPU even where a GPU is present (with --gpus N: N CPU processes).")] = False,
    # A plain string, checked by check_options: a bad value is then one error line, not a usage box.
    strategy: Annotated[str, typer.Option(metavar="[ddp|fsdp]", help="Several processes: ddp gives each the whole model and optimizer; fsdp shards weights, gradients and optimizer state over them (about 1/N each, not the activations) for more communication. Same checkpoints either way; fsdp not with --precision fp16.")] = "ddp",
    powersgd_rank: Annotated[Optional[int], typer.Option(metavar="R", help="ddp, several processes: all-reduce weight-matrix gradients as rank-R PowerSGD approximations with error feedback (exact for the warm-up or the first 10% of steps, up to 1,000, whichever is longer). The error feedback is not checkpointed: a resumed run is not bitwise identical.")] = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    from dallecli.commands.common import refuse_nonpositive, resumed_run, start
    from dallecli.hardware import default_precision

    start(quiet, debug)
    import dataclasses
    import sys

    import torch

    from dallecli.config import RunDir
    from dallecli.console import UserError
    from dallecli.models.prior import PRESETS
    from dallecli.text import Tokenizer
    from dallecli.train.distributed import check_options
    from dallecli.train.launch import launched, maybe_relaunch
    from dallecli.train.loop import TrainConfig, train
    from dallecli.train.task import exit_code_for
    from dallecli.train.prior_task import PriorTask, codes_info

    preset = getattr(preset, "value", preset)  # a Preset from the command line, a str from the demo
    rd = RunDir(run)
    out = out or rd.prior
    resumed_model, resumed_train = resumed_run(out, "prior", fresh)
    if preset is None:  # a rerun continues the run's own preset (its width and depth); else `small`
        shape = {k: resumed_model.get(k) for k in ("d_model", "n_layers", "n_heads")}
        preset = next((p for p, c in PRESETS.items() if resumed_model and shape == {k: getattr(c, k) for k in shape}),
                      "small")
    batch_size = resumed_train.get("batch_size") if batch_size is None else batch_size
    lr = resumed_train.get("lr") if lr is None else lr
    warmup = resumed_train.get("warmup") if warmup is None else warmup
    # ... and its schedule, EMA, seed, gradient accumulation and caption dropouts (the task's, in its meta)
    from dallecli import checkpoint

    resumed_meta = checkpoint.load(out, "prior").meta if resumed_model else {}
    schedule = schedule.value if schedule else resumed_train.get("schedule")
    ema_decay = resumed_train.get("ema_decay", 0.99) if ema_decay is None else ema_decay
    seed = resumed_train.get("seed", 0) if seed is None else seed
    bpe_dropout = resumed_meta.get("bpe_dropout", 0.1) if bpe_dropout is None else bpe_dropout
    cond_drop = resumed_meta.get("cond_drop", 0.1) if cond_drop is None else cond_drop
    if preset not in PRESETS:
        raise UserError(f"unknown prior preset '{preset}'; choose one of {', '.join(PRESETS)}")
    for flag, rate in (("--dropout", dropout), ("--bpe-dropout", bpe_dropout), ("--cond-drop", cond_drop)):
        if rate is not None and not 0 <= rate < 1:
            raise UserError(f"{flag} must be in [0, 1) (got {rate})")
    refuse_nonpositive(steps=steps, batch_size=batch_size, lr=lr, global_batch=global_batch)
    if text_len is not None and text_len < 1:
        raise UserError(f"--text-len must be at least 1 (got {text_len}; the paper's is 256)")
    if warmup is not None and warmup < 0:
        raise UserError(f"--warmup must be ≥ 0 (got {warmup})")
    if ema_decay is not None and not 0 <= ema_decay < 1:
        raise UserError(f"--ema-decay must be in [0, 1) (got {ema_decay}; the paper's is 0.99)")
    on_gpu = torch.cuda.is_available() and not cpu
    precision_name = precision.value if precision else default_precision(on_gpu)
    check_options(strategy, powersgd_rank, precision_name)  # here, not once in every relaunched process
    d_steps, d_batch, d_lr, d_warm = DEFAULTS[preset]
    batch = d_batch if batch_size is None else batch_size
    # All processes: this one's --gpus × --nodes before the relaunch; a launched process's command line has
    # no --gpus any more, so it takes the count from the launcher.
    world = int(os.environ.get("WORLD_SIZE", gpus * nodes)) if launched() else gpus * nodes
    accum = resumed_train.get("grad_accum", 1) if global_batch is None else 1
    if global_batch is not None:
        if global_batch % (batch * world):
            raise UserError(f"--global-batch {global_batch} is not a multiple of --batch-size × processes "
                            f"({batch} × {world})")
        accum = global_batch // (batch * world)
    codes = codes or rd.codes
    tok = Tokenizer.load(tokenizer or rd.tokenizer)
    dvae = codes_info(codes)
    if not launched() and Path(codes).resolve() == rd.codes.resolve():  # the run's codes of the run's shards:
        from dallecli.codes import stale_codes

        if stale := stale_codes(codes, rd.shards):  # rebuilt after encoding, the prior would learn old data
            from dallecli.console import warn

            more = f" and {len(stale) - 1} more" if len(stale) > 1 else ""
            warn(f"the image shards in {rd.shards} changed since {codes} was encoded ({stale[0]}{more}): this "
                 "trains on the old codes; run `dalle encode` first (with --overwrite if a prior was trained on them)")
    maybe_relaunch(gpus, nodes, node_rank, main_address, main_port, cpu)  # after the input checks: fail in seconds
    changes = {"text_vocab": tok.vocab_size, "image_vocab": dvae["vocab_size"], "grid": dvae["grid"],
               "pad_id": tok.pad_id}
    for name, value in (("text_len", text_len), ("dropout", dropout), ("checkpoint_activations", checkpoint_activations)):
        if value is not None:
            changes[name] = value
    if attention is not None:
        changes["attention"] = attention.value
    for name in ("text_len", "dropout", "checkpoint_activations", "attention"):  # a rerun keeps the run's own
        if name not in changes and name in resumed_model:
            changes[name] = resumed_model[name]
    config = dataclasses.replace(PRESETS[preset], **changes)
    cfg = TrainConfig(
        steps=resumed_train.get("steps", d_steps) if steps is None else steps, batch_size=batch, lr=d_lr if lr is None else lr,
        warmup=d_warm if warmup is None else warmup,
        schedule=schedule or ("cosine" if preset in SHORT_RUN_PRESETS else "plateau"),
        betas=(0.9, 0.96), eps=1e-8, weight_decay=4.5e-2, grad_clip=4.0,  # App. B
        ema_decay=ema_decay, precision=precision_name,
        save_every=save_every, eval_every=eval_every, keep=keep, seed=seed, workers=workers, grad_accum=accum,
        max_errors=max_errors, strategy=strategy, powersgd_rank=powersgd_rank)
    task = PriorTask(config=config, codes=codes, tokenizer=tok, dvae_fingerprint=dvae["fingerprint"],
                     batch_size=batch, seed=seed, bpe_dropout=bpe_dropout, cond_drop=cond_drop, workers=workers)
    scaler = wrap = None
    if cfg.precision == "fp16":
        from dallecli.train.precision import per_resblock_scaling

        scaler, wrap = per_resblock_scaling(world)
    result = train(task, cfg, out, fresh=fresh, cpu=cpu, scaler=scaler, wrap_model=wrap)
    code = exit_code_for(result)
    if code:
        sys.exit(code)
