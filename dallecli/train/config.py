"""The training loop's settings (`TrainConfig`), shared by every training command, and their validation."""
from __future__ import annotations

from dataclasses import dataclass

from dallecli.console import UserError
from dallecli.train import distributed


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # per process; the global batch is batch_size × processes × grad_accum
    lr: float = 1e-4
    min_lr: float = 0.0  # where the cosine schedule ends
    decay_steps: int | None = None  # cosine length (None: the whole run); constant at min_lr after it
    warmup: int = 0  # linear warm-up steps
    schedule: str = "cosine"  # cosine | plateau (halve on a val-loss plateau, §B) | constant
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float | None = None
    ema_decay: float | None = None
    precision: str = "fp32"  # fp32 | bf16 | fp16
    save_every: int = 500
    eval_every: int = 250
    log_every: int = 10
    keep: int = 3
    seed: int = 0
    workers: int = 0
    grad_accum: int = 1
    max_nonfinite: int = 20  # abort after this many non-finite steps in a row
    max_errors: int = 100  # abort after this many bad samples in a row
    plateau_patience: int = 2  # evaluations without improvement before halving (plateau schedule)
    plateau_halvings: int = 5  # the paper halves the learning rate 5 times
    strategy: str = "ddp"  # ddp: replicate the model | fsdp: shard parameters, gradients, optimizer state
    powersgd_rank: int | None = None  # compress DDP's gradient all-reduce to this rank (None: exact)



def check_config(cfg: TrainConfig) -> None:
    """Refuse settings the loop cannot run with, at once (not after hours of training), naming the flag."""
    rules = [(cfg.steps >= 0, "--steps must be at least 0"),
             (cfg.batch_size >= 1, "--batch-size must be at least 1"),
             (cfg.save_every >= 1, "--save-every must be at least 1"),
             (cfg.eval_every >= 0, "--eval-every must be ≥ 0"),
             (cfg.log_every >= 1, "--log-every must be at least 1"), (cfg.keep >= 1, "--keep must be at least 1"),
             (cfg.grad_accum >= 1, "gradient accumulation must be at least 1"),
             (cfg.max_errors >= 1, "--max-errors must be at least 1"),
             (cfg.max_nonfinite >= 1, "the non-finite step limit must be at least 1"),
             (cfg.workers >= 0, "--workers must be ≥ 0"), (cfg.lr >= 0, "--lr must be ≥ 0"),
             (cfg.warmup >= 0, f"--warmup must be ≥ 0 (got {cfg.warmup})"),
             (0 <= cfg.seed < 2**63, f"--seed must be between 0 and 2**63 − 1 (got {cfg.seed})"),
             (cfg.weight_decay >= 0, f"--weight-decay must be ≥ 0 (got {cfg.weight_decay})"),
             (cfg.ema_decay is None or 0 <= cfg.ema_decay < 1,
              f"--ema-decay must be in [0, 1) (got {cfg.ema_decay}; the paper's are 0.999 and 0.99)"),
             (cfg.grad_clip is None or cfg.grad_clip > 0, f"the gradient clip must be > 0 (got {cfg.grad_clip})"),
             (cfg.schedule in ("cosine", "plateau", "constant"), "the schedule must be cosine, plateau or constant"),
             (cfg.precision in ("fp32", "bf16", "fp16"),
              f"--precision must be fp32, bf16 or fp16 (got {cfg.precision})")]
    for ok, message in rules:
        if not ok:
            raise UserError(message)
    distributed.check_options(cfg.strategy, cfg.powersgd_rank, cfg.precision)
