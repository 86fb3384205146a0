"""The one training loop, shared by the dVAE, the prior and CLIP.

The loop knows nothing about the model it trains beyond the small `Task` interface below: it builds
the optimizer, runs the steps (gradient accumulation, clipping, mixed precision, EMA, the learning-rate
schedule), skips non-finite steps, evaluates, logs metrics.jsonl, and saves and resumes checkpoints
exactly (DESIGN.md, "Checkpoints"). Accelerate provides the processes, devices and DDP wrapping;
autocast and gradient scaling are done here so the paper's per-resblock scheme can plug in.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

import numpy as np
import torch
from torch import nn

from dallecli import checkpoint
from dallecli.config import to_dict, write_json_atomic
from dallecli.console import UserError, info, progress, summary, warn
from dallecli.data.loader import Batch


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # per process; the global batch is batch_size × processes × grad_accum
    lr: float = 1e-4
    min_lr: float = 0.0  # where the cosine schedule ends
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


class Task(Protocol):
    """What the loop needs to know about a model and its data."""

    kind: str  # checkpoint kind: dvae | prior | clip
    unit: str  # what the progress rate counts: img | tok

    def model_config(self) -> dict[str, Any]: ...
    def meta(self) -> dict[str, Any]: ...
    def build_model(self) -> nn.Module: ...
    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]: ...
    def loader(self, start_batch: int, rank: int, world: int) -> Iterable[Batch]: ...
    def count(self, batch: Batch) -> int: ...
    def loss(self, model: nn.Module, data: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]: ...
    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]: ...
    def check_resume(self, ck: checkpoint.Checkpoint) -> None: ...


@dataclass
class TrainResult:
    step: int
    checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    stopped_by: str | None = None


class Stop(Exception):
    """Raised when a signal asks the run to stop after saving."""

    def __init__(self, signum: int):
        self.signum = signum


# --- schedules -------------------------------------------------------------------------------------------

def cosine(step: int, total: int, start: float, end: float) -> float:
    """Cosine from `start` at step 0 to `end` at `total` (and after)."""
    t = min(max(step, 0), total) / max(total, 1)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t))


def learning_rate(cfg: TrainConfig, step: int, halvings: int = 0) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup > 0 else 1.0
    if cfg.schedule == "cosine":
        return warm * cosine(step - cfg.warmup, max(1, cfg.steps - cfg.warmup), cfg.lr, cfg.min_lr)
    if cfg.schedule == "plateau":
        return warm * cfg.lr * 0.5 ** halvings
    return warm * cfg.lr


def ema_decay_at(decay: float, step: int) -> float:
    # Warm the EMA up: with decay 0.999 a 500-step run would otherwise keep 60% of the initial weights.
    return min(decay, (1 + step) / (10 + step))


# --- state that must survive a resume ----------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate()),
             "numpy": json.dumps(np.random.get_state()[1].tolist())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(("MT19937", np.array(json.loads(state["numpy"]), dtype=np.uint32), 624, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def config_diff(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k)!r} != now {current.get(k)!r}" for k in keys
            if saved.get(k) != current.get(k)]


class NoScaler:
    """fp32 and bf16 need no gradient scaling."""

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def unscale_(self, optimizer) -> None:
        pass

    def finite(self, model: nn.Module) -> bool:
        return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())

    def update(self, finite: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class GlobalScaler(NoScaler):
    """One dynamic loss scale for fp16 (the dVAE and CLIP; the prior uses per-resblock scales)."""

    def __init__(self, init: float = 2.0**13, growth_interval: int = 1000):
        self.value, self.good, self.interval = init, 0, growth_interval
        self._unscaled = False

    def scale(self, loss):
        return loss * self.value

    def unscale_(self, optimizer):
        inv = 1.0 / self.value
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(inv)

    def update(self, finite):
        if finite:
            self.good += 1
            if self.good % self.interval == 0:
                self.value = min(self.value * 2, 2.0**24)
        else:
            self.value, self.good = max(self.value / 2, 1.0), 0

    def state_dict(self):
        return {"value": self.value, "good": self.good}

    def load_state_dict(self, state):
        self.value, self.good = float(state["value"]), int(state["good"])


# --- the loop ---------------------------------------------------------------------------------------------

def _metrics_file(out: Path, resume_step: int) -> Path:
    """metrics.jsonl, with any lines past the step being resumed dropped (they will be redone)."""
    path = out / "metrics.jsonl"
    if path.exists():
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return path


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(task: Task, cfg: TrainConfig, out: Path, *, fresh: bool = False, cpu: bool = False,
          scaler: Any = None, wrap_model=None) -> TrainResult:
    """Train `task` into checkpoint folder `out`, resuming from its latest checkpoint unless `fresh`.

    `scaler` overrides gradient scaling (the prior's per-resblock scheme); `wrap_model(model)` may
    return a model prepared for it.
    """
    from accelerate import Accelerator

    out = Path(out)
    accelerator = Accelerator(cpu=cpu or not torch.cuda.is_available())
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    if cfg.precision not in ("fp32", "bf16", "fp16"):
        raise UserError(f"--precision must be fp32, bf16 or fp16 (got {cfg.precision})")
    if cfg.precision != "fp32" and device.type == "cpu":
        warn(f"--precision {cfg.precision} on a CPU: autocast is slow there; fp32 is the CPU default")
    autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]

    seed_everything(cfg.seed)
    model = task.build_model()
    if wrap_model is not None:
        model = wrap_model(model)
    optimizer = torch.optim.AdamW(task.param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                  eps=cfg.eps)
    if scaler is None:
        scaler = GlobalScaler() if cfg.precision == "fp16" else NoScaler()

    step, halvings, best, bad_evals, nonfinite_total = 0, 0, math.inf, 0, 0
    ema: dict[str, torch.Tensor] | None = None
    ck = None if fresh else (checkpoint.latest(out) if out.exists() else None)
    if fresh and main and out.exists() and checkpoint.latest(out) is not None:
        info(f"--fresh: starting over; the checkpoints in {out} will be replaced as the new run saves")
    if ck is not None:
        ck = checkpoint.load(ck, task.kind)
        diff = config_diff(ck.model_config, task.model_config())
        if diff:
            raise UserError(f"cannot resume {ck.path}: the model differs ({'; '.join(diff[:3])}); "
                            "use the same options, or --fresh to start over")
        task.check_resume(ck)
        model.load_state_dict(ck.weights(ema=False))
        state = ck.training_state()
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state.get("scaler", {}))
        step, halvings = int(state["step"]), int(state["halvings"])
        best, bad_evals = float(state["best"]), int(state["bad_evals"])
        nonfinite_total = int(state["nonfinite"])
        set_rng_state(state["rng"])
        ema = ck.ema_weights()
        if step >= cfg.steps and main:
            info(f"{out} is already at step {step} (≥ --steps {cfg.steps}); raise --steps to train further")

    model.to(device)
    if cfg.ema_decay is not None:
        ema = {k: (ema[k] if ema is not None else v.detach()).to(device=device, dtype=torch.float32).clone()
               for k, v in model.state_dict().items()}
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)

    metrics_path = _metrics_file(out, step) if main else None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "train_config.json", to_dict(cfg))

    def save(at: int) -> Path | None:
        if not main:
            return None
        weights = raw.state_dict()
        if any(not torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()):
            raise UserError(f"refusing to save step {at}: the weights hold NaN or Inf")
        state = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": at,
                 "halvings": halvings, "best": best, "bad_evals": bad_evals, "nonfinite": nonfinite_total,
                 "rng": rng_state(), "data_position": at * cfg.grad_accum}
        return checkpoint.save(out, at, kind=task.kind, model_config=task.model_config(), weights=weights,
                               ema=ema, training_state=state, meta=task.meta(), keep=cfg.keep)

    def evaluate(at: int) -> dict[str, float]:
        nonlocal halvings, best, bad_evals
        # Evaluation must not disturb the training RNG (a resumed run would diverge otherwise).
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            if ema is not None:
                backup = {k: v.detach().clone() for k, v in raw.state_dict().items()}
                raw.load_state_dict({k: v.to(backup[k].dtype) for k, v in ema.items()})
            raw.eval()
            with torch.no_grad(), _autocast(device, autocast_dtype):
                result = task.evaluate(raw, at)
            raw.train()
            if ema is not None:
                raw.load_state_dict(backup)
        val = result.get("val_loss")
        if cfg.schedule == "plateau" and val is not None:
            if val < best - 1e-4:
                best, bad_evals = val, 0
            else:
                bad_evals += 1
                if bad_evals >= cfg.plateau_patience and halvings < cfg.plateau_halvings:
                    halvings, bad_evals = halvings + 1, 0
        return result

    stop: list[int] = []
    handlers = {}
    if main:
        for sig in (signal.SIGTERM, signal.SIGINT):
            handlers[sig] = signal.signal(sig, lambda signum, frame: stop.append(signum))

    loader = iter(task.loader(step * cfg.grad_accum, rank, world))
    last_saved = None
    last_metrics: dict[str, float] = {}
    consecutive_errors = consecutive_nonfinite = 0
    tic = time.perf_counter()
    model.train()
    try:
        with progress(f"train {task.kind}", total=cfg.steps, unit=f"{task.unit}", start=step) as bar:
            while step < cfg.steps:
                lr = learning_rate(cfg, step, halvings)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                losses, parts, count = [], {}, 0
                for micro in range(cfg.grad_accum):
                    batch = next(loader)
                    for err in batch.errors:
                        consecutive_errors += 1
                        if main:
                            warn(f"skipping {err['shard']}:{err['key']}: {err['reason']}")
                        if consecutive_errors >= cfg.max_errors:
                            raise UserError(f"{consecutive_errors} bad samples in a row (last: {err['shard']}:"
                                            f"{err['key']}: {err['reason']}); fix the shards or raise --max-errors")
                    if batch.data is None:
                        continue
                    consecutive_errors = 0
                    count += task.count(batch)
                    sync = micro == cfg.grad_accum - 1
                    with (accelerator.no_sync(model) if not sync and world > 1 else _null()):
                        with _autocast(device, autocast_dtype):
                            loss, part = task.loss(model, batch.data, step)
                        accelerator.backward(scaler.scale(loss / cfg.grad_accum))
                    losses.append(loss.detach())
                    for k, v in part.items():
                        parts[k] = parts.get(k, 0.0) + float(v) / cfg.grad_accum
                loss_value = float(torch.stack(losses).mean()) if losses else math.nan
                scaler.unscale_(optimizer)
                finite = math.isfinite(loss_value) and scaler.finite(raw)
                if world > 1:
                    flag = torch.tensor([1.0 if finite else 0.0], device=device)
                    finite = bool(accelerator.reduce(flag, reduction="min").item() > 0)
                scaler.update(finite)
                if finite:
                    if cfg.grad_clip:
                        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip))
                        parts["grad_norm"] = grad_norm
                    optimizer.step()
                    if ema is not None:
                        d = ema_decay_at(cfg.ema_decay, step)
                        with torch.no_grad():
                            for k, v in raw.state_dict().items():
                                if v.is_floating_point():
                                    ema[k].lerp_(v.float(), 1 - d)
                                else:
                                    ema[k].copy_(v)
                    consecutive_nonfinite = 0
                else:
                    nonfinite_total += 1
                    consecutive_nonfinite += 1
                    if main:
                        warn(f"step {step}: non-finite loss or gradients; update skipped "
                             f"({consecutive_nonfinite} in a row)")
                    if consecutive_nonfinite >= cfg.max_nonfinite:
                        raise UserError(f"{consecutive_nonfinite} non-finite steps in a row at step {step}; "
                                        "lower --lr or use --precision fp32/bf16; the last checkpoint is intact")
                optimizer.zero_grad(set_to_none=True)
                step += 1
                elapsed = time.perf_counter() - tic
                last_metrics = {"loss": loss_value, **parts}
                bar.advance(1, rate_count=count * world, loss=loss_value)
                if main and (step % cfg.log_every == 0 or step == cfg.steps):
                    _append(metrics_path, {"step": step, "split": "train", "loss": loss_value, **parts, "lr": lr,
                                           "skipped": nonfinite_total, "elapsed": round(elapsed, 3),
                                           f"{task.unit}_per_s": round(bar.rate, 2)})
                if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                    result = evaluate(step)
                    last_metrics.update(result)
                    if main and result:
                        _append(metrics_path, {"step": step, "split": "val", **result})
                if step % cfg.save_every == 0 or step == cfg.steps or stop:
                    last_saved = save(step) or last_saved
                if stop:
                    raise Stop(stop[0])
    except Stop as s:
        if main:
            info(f"stopped by signal {s.signum} after step {step}; checkpoint saved: {last_saved}")
        return TrainResult(step, last_saved, last_metrics, stopped_by=signal.Signals(s.signum).name)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        accelerator.wait_for_everyone()
    if last_saved is None and main:
        last_saved = checkpoint.latest(out)
    if main:
        summary(f"train-{task.kind}: done", {"steps": step, "checkpoint": last_saved,
                                             "metrics": metrics_path,
                                             **{k: f"{v:.4g}" for k, v in last_metrics.items()}})
    return TrainResult(step, last_saved, last_metrics)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return _null()
    return torch.autocast(device_type=device.type, dtype=dtype)


def exit_code_for(result: TrainResult) -> int:
    """128 + signal number, as shells report it: 143 for SIGTERM, 130 for SIGINT."""
    return {"SIGTERM": 143, "SIGINT": 130}.get(result.stopped_by or "", 0)
