"""`dalle train-clip`: the contrastive model that reranks samples (§2.6), trained on the run's image shards."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dallecli.commands.common import DEFAULT_RUN, DebugOpt, TrainPrecision, QuietOpt, RunOpt


# Per shipped architecture: (steps, batch size per process, peak learning rate). `dalle-tiny`: 500 updates of
# 128 pairs, about two to three minutes on two cores in bf16: enough to rerank the shapes world (best of 8
# lifts checker accuracy from ~50% to ~80% on seen objects). Other architectures get a GPU-sized default.
DEFAULTS = {"dalle-tiny": (500, 128, 1e-3), "dalle-small": (5000, 256, 5e-4)}
OTHER = (10_000, 128, 5e-4)
_TINY_STEPS, _TINY_BATCH, _TINY_LR = DEFAULTS["dalle-tiny"]  # quoted in the help below, so that it cannot drift


def command(
    run: RunOpt = DEFAULT_RUN,
    model: Annotated[Optional[str], typer.Option(
        help="Architecture: a shipped one (dalle-tiny, dalle-small) or any open_clip name (ViT-B-32, RN50, …), "
             "trained from scratch (default: dalle-tiny; a rerun continues the run's own).", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help=f"Total updates (a rerun: the run's own; default: per model; dalle-tiny {_TINY_STEPS}).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Image–caption pairs per process per update; the contrastive "
                                                           f"loss sees batch × processes (default: per model; dalle-tiny {_TINY_BATCH}).")] = None,
    lr: Annotated[Optional[float], typer.Option(help=f"Peak learning rate, cosine to 0 after a 5% warm-up (default: per model; dalle-tiny {_TINY_LR:g}).")] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (not on gains, biases or the temperature).")] = 0.1,
    precision: Annotated[Optional[TrainPrecision], typer.Option(help="bf16 (default on a GPU and on CPUs with native bf16), fp32 (other CPUs) or fp16.")] = None,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Random 90–100% square crops (never flips).")] = True,
    save_every: Annotated[int, typer.Option(help="Save a checkpoint every N updates.")] = 200,
    eval_every: Annotated[int, typer.Option(help="Validate (loss, image→text top-1/top-5 on the val split) every N updates; 0: never.")] = 100,
    keep: Annotated[int, typer.Option(help="Keep the newest N checkpoints.")] = 3,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    workers: Annotated[int, typer.Option(help="Data-loader worker processes.")] = 0,
    max_errors: Annotated[int, typer.Option(help="Stop after this many unreadable samples in a row.")] = 100,
    fresh: Annotated[bool, typer.Option("--fresh", help="Start over instead of resuming from the latest checkpoint.")] = False,
    shards: Annotated[Optional[Path], typer.Option(help="Image shards with captions (default RUN/shards).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Checkpoint folder (default RUN/clip).")] = None,
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
    from dallecli.hardware import default_precision

    start(quiet, debug)
    import os
    import sys

    from dallecli.config import RunDir
    from dallecli.console import UserError, info
    from dallecli.train.launch import launched, maybe_relaunch

    if (steps is not None and steps < 1) or (batch_size is not None and batch_size < 2):
        raise UserError("--steps must be at least 1 and --batch-size at least 2 (a contrastive batch needs negatives)")
    refuse_nonpositive(lr=lr)
    if not weight_decay >= 0:
        raise UserError(f"--weight-decay must be ≥ 0 (got {weight_decay})")
    import torch

    from dallecli.data.records import list_shards
    from dallecli.models.clip import architecture, default_preprocess, export_open_clip
    from dallecli.train.clip_task import ClipTask
    from dallecli.train.dvae_task import shard_image_size
    from dallecli.train.loop import TrainConfig, train
    from dallecli.train.task import exit_code_for

    rd = RunDir(run)
    shards = shards or rd.shards
    out = out or rd.clip
    # A rerun continues the run: options left out are the run's own (its architecture, batch size, lr)
    resumed_model, resumed_train = resumed_run(out, "clip", fresh)
    model = model or resumed_model.get("name") or "dalle-tiny"
    batch_size = resumed_train.get("batch_size") if batch_size is None else batch_size
    lr = resumed_train.get("lr") if lr is None else lr
    model_cfg = architecture(model)
    if eval_every and not list_shards(shards, "val"):
        raise UserError(f"no val shards in {shards}: validation (retrieval accuracy) needs held-out images; rebuild "
                        "them with a larger --val-fraction (`dalle build-shards --val-fraction 0.1 --overwrite`), or "
                        "pass --eval-every 0")
    preprocess_cfg = default_preprocess(model_cfg)
    size, want = shard_image_size(shards), preprocess_cfg["size"]
    if size != want and not launched():
        info(f"the shard images are {size} px and {model} takes {want} px: they are resized as they are read")
    maybe_relaunch(gpus, nodes, node_rank, main_address, main_port, cpu)  # after the input checks: fail in seconds
    default_steps, default_batch, default_lr = DEFAULTS.get(model, OTHER)
    steps = resumed_train.get("steps", default_steps) if steps is None else steps  # a rerun: the run's own
    on_gpu = torch.cuda.is_available() and not cpu
    cfg = TrainConfig(
        steps=steps, batch_size=default_batch if batch_size is None else batch_size,
        lr=default_lr if lr is None else lr, min_lr=0.0,
        warmup=max(1, min(2000, steps // 20)), schedule="cosine",
        betas=(0.9, 0.98), eps=1e-6, weight_decay=weight_decay,  # open_clip's AdamW settings for ViTs
        grad_clip=None, ema_decay=None,  # no EMA: model.safetensors is what open_clip's local-dir loads
        precision=(precision.value if precision else default_precision(on_gpu)),
        save_every=save_every, eval_every=eval_every, log_every=10, keep=keep, seed=seed, workers=workers,
        max_errors=max_errors)
    task = ClipTask(name=model, model_cfg=model_cfg, preprocess_cfg=preprocess_cfg, shards=shards,
                    batch_size=cfg.batch_size, seed=seed, workers=workers, augment=augment)
    try:
        result = train(task, cfg, out, fresh=fresh, cpu=cpu)
    finally:
        # open_clip_config.json beside each checkpoint's weights: `open_clip.create_model("local-dir:STEP")` loads it.
        if os.environ.get("RANK", "0") == "0":
            try:
                export_open_clip(out)
            except UserError:
                pass  # not a CLIP folder: train() has already said so
    code = exit_code_for(result)
    if code:
        sys.exit(code)
