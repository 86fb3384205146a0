"""The one training loop, shared by the dVAE, the prior and CLIP.

The loop knows nothing about the model it trains beyond the small `Task` interface below: it builds
the optimizer, runs the steps (gradient accumulation, clipping, mixed precision, EMA, the learning-rate
schedule), skips non-finite steps, evaluates, logs metrics.jsonl, and saves and resumes checkpoints
exactly (DESIGN.md, "Checkpoints"). Accelerate provides the processes, devices and DDP wrapping;
autocast and gradient scaling are done here so the paper's per-resblock scheme can plug in. With several
processes, `strategy="fsdp"` shards the model instead of replicating it and `powersgd_rank` compresses
DDP's gradient all-reduce (train/distributed.py). Beside it: the settings (train/config.py), the optimizer
and schedules (train/schedule.py), what a checkpoint's training state holds (train/state.py), the checkpoint
folder's resume, --fresh and --keep rules (train/saves.py), the JSONL files (train/runfiles.py), the stop
signals (train/signals.py) and the `Task` interface with the result of a run (train/task.py).
"""
from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from dallecli import checkpoint
from dallecli.config import to_dict
from dallecli.console import UserError, info, progress, summary, warn
from dallecli.hardware import cpu_has_bf16, matmul_peak, model_flops_utilisation
from dallecli.train import distributed, runfiles
from dallecli.train.precision import GlobalScaler, NoScaler
from dallecli.train.saves import RunCheckpoints, does_not_fit
from dallecli.train.config import TrainConfig, check_config
from dallecli.train.schedule import adamw, ema_decay_at, learning_rate
from dallecli.train.signals import StopSignals
from dallecli.train.state import (Counters, config_diff, first_nonfinite, process_step_seed, rng_snapshot, rng_state,
                                  seed_everything, set_rng_state, update_ema)
from dallecli.train.task import Task, TrainResult


def train(task: Task, cfg: TrainConfig, out: Path, *, fresh: bool = False, cpu: bool = False,
          scaler: Any = None, wrap_model=None) -> TrainResult:
    """Train `task` into checkpoint folder `out`, resuming from its latest checkpoint unless `fresh`.

    `scaler` overrides gradient scaling (the prior's per-resblock scheme); `wrap_model(model)` may
    return a model prepared for it.
    """
    check_config(cfg)
    if Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out {out} is a file, not a folder; give a folder for the checkpoints")
    with StopSignals() as stop:  # at once: a signal during set-up stops before the first step
        trainer = None
        try:
            trainer = _Trainer(task, cfg, Path(out), stop, fresh=fresh, cpu=cpu, scaler=scaler, wrap_model=wrap_model)
            return trainer.run()
        except KeyboardInterrupt:  # a second Ctrl-C: out at once, without saving the step it was on
            if trainer is not None and trainer.main:
                again = "; rerun to continue from it" if trainer.saves.path else ""
                info(f"stopped at once by a second Ctrl-C: {trainer.saves.kept()}{again}")
            raise


class _Trainer:
    """One call of `train`. The set-up runs in __init__: devices, model, resume from the latest checkpoint,
    sharding or DDP wrapping, the run's files. Then `run` loops over optimizer updates: `_accumulate` the
    micro-batches' gradients, `_update` (or skip a non-finite step), `_record` (progress, metrics,
    evaluation, checkpoints)."""

    def __init__(self, task: Task, cfg: TrainConfig, out: Path, stop: StopSignals, *, fresh: bool, cpu: bool,
                 scaler: Any, wrap_model):
        from accelerate import Accelerator

        self.task, self.cfg, self.out, self.stop = task, cfg, out, stop
        self.accelerator = accelerator = Accelerator(cpu=cpu or not torch.cuda.is_available())
        self.device, self.rank, self.world = accelerator.device, accelerator.process_index, accelerator.num_processes
        self.main = main = accelerator.is_main_process
        native = cfg.precision == "bf16" and cpu_has_bf16()
        if cfg.precision != "fp32" and self.device.type == "cpu" and not native and main:
            default = "bf16" if cpu_has_bf16() else "fp32"
            warn(f"--precision {cfg.precision}: this CPU has no native {cfg.precision} arithmetic, so autocast to it "
                 f"is emulated and slow; the default here is {default}")
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
        if self.device.type == "cuda":  # the fp32 heads and logits (§2.4) on TF32 tensor cores: 13% faster (H100)
            torch.backends.cuda.matmul.allow_tf32 = True
        self.sharded = cfg.strategy == "fsdp" and self.world > 1
        if main and cfg.strategy == "fsdp" and self.world == 1:
            info("--strategy fsdp with one process: nothing to shard; training the whole model here")
        if main and cfg.powersgd_rank is not None and self.world == 1:
            info("--powersgd-rank with one process: no gradients are exchanged; PowerSGD is off")

        seed_everything(cfg.seed)
        self.model = task.build_model()
        if wrap_model is not None:
            self.model = wrap_model(self.model)
        # Sharded, the optimizer must hold the parameter shards: it is built once the model is sharded (_place).
        self.optimizer = None if self.sharded else self._new_optimizer()
        self.scaler = scaler if scaler is not None else GlobalScaler() if cfg.precision == "fp16" else NoScaler()
        self.step, self.counters = 0, Counters()
        self.ema: dict[str, torch.Tensor] | None = None
        self.rejects: list[dict] = []
        self.last_metrics: dict[str, float] = {}
        self.saves = RunCheckpoints(task, out, cfg.keep, main, to_dict(cfg))
        ck, resume_optimizer = self._resume(fresh)
        self.start_step = self.step
        if ck is not None:
            self.saves.resumed(self.step, ck.path)
        self._place(ck, resume_optimizer)
        if main:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise runfiles.write_error(out / "metrics.jsonl", exc) from None
            self.saves.open_logs(self.step)

    # --- set-up ---------------------------------------------------------------------------------------------

    def _new_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        return adamw(self.task.param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)

    def _resume(self, fresh: bool) -> tuple[checkpoint.Checkpoint | None, dict | None]:
        """Load the latest checkpoint of `out` (unless `fresh`) into the model, optimizer, scaler, counters and
        RNG. Returns it and, sharded, its optimizer state (loaded once the model is sharded)."""
        out, cfg, main = self.out, self.cfg, self.main
        latest = self.saves.latest(fresh, self.accelerator.wait_for_everyone)
        if latest is None:
            return None, None
        ck = checkpoint.load(latest, self.task.kind)
        diff = config_diff(ck.model_config, self.task.model_config())
        if diff:
            raise UserError(f"cannot resume {ck.path}: the model differs ({'; '.join(diff[:3])}); "
                            "use the same options, or --fresh to start over")
        self.task.check_resume(ck)
        state = ck.training_state()
        resume_optimizer = None
        try:
            self.model.load_state_dict(ck.weights(ema=False))  # on every process (sharding splits them later)
            if self.optimizer is not None:
                self.optimizer.load_state_dict(state["optimizer"])
            else:
                resume_optimizer = state["optimizer"]
            self.scaler.load_state_dict(state.get("scaler", {}))
            self.step, self.counters = int(state["step"]), Counters.from_state(state)
            set_rng_state(state["rng"])
        except KeyError as exc:
            raise UserError(f"cannot resume {ck.path}: its training state lacks the field {exc}; "
                            "resume from another checkpoint or use --fresh") from None
        except (RuntimeError, ValueError, TypeError) as exc:
            raise does_not_fit(ck, exc) from None
        self.ema = ck.ema_weights()
        if self.step >= cfg.steps and main:
            info(f"{out} is already at step {self.step} (≥ --steps {cfg.steps}); raise --steps to train further")
        return ck, resume_optimizer

    def _place(self, ck: checkpoint.Checkpoint | None, resume_optimizer: dict | None) -> None:
        """Move the model to its device; shard it (FSDP) or wrap it for DDP; the EMA beside it; PowerSGD."""
        cfg, device, model = self.cfg, self.device, self.model
        model.to(device)
        if self.sharded:
            distributed.shard_model(model, device, self.world)
            self.optimizer = self._new_optimizer()
            if resume_optimizer is not None:
                try:
                    distributed.load_optimizer_state(model, self.optimizer, resume_optimizer)
                except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as exc:
                    raise does_not_fit(ck, exc) from None
        if cfg.ema_decay is not None:
            # Sharded, the EMA is kept in shards like the weights it follows, and gathered when saved.
            ema = self.ema
            self.ema = {k: (distributed.shard_like(ema[k], v) if ema is not None else v.detach())
                        .to(device=device, dtype=torch.float32).clone() for k, v in model.state_dict().items()}
        if self.sharded:
            self.raw = model  # not prepared: Accelerate would wrap the sharded model in DDP
        else:
            self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
            self.raw = self.accelerator.unwrap_model(self.model)
        self.powersgd = None
        if cfg.powersgd_rank is not None and self.world > 1:
            if not hasattr(self.model, "register_comm_hook"):
                raise UserError("--powersgd-rank needs the DDP-wrapped model, which Accelerate did not make here")
            start = distributed.powersgd_start(cfg.steps, cfg.warmup, self.step)
            self.powersgd = distributed.register_powersgd(self.model, cfg.powersgd_rank, start)
            if self.main and start >= cfg.steps - self.step:  # the warm-up (--warmup) outlasts the run
                warn(f"--powersgd-rank {cfg.powersgd_rank}: the first {start} steps use the exact all-reduce, and "
                     f"{cfg.steps - self.step} are left to train, so nothing is compressed; lower --warmup or "
                     "train longer")
            elif self.main:
                info(f"PowerSGD rank {cfg.powersgd_rank}: exact gradient all-reduce for {start} more steps, "
                     "then compressed")

    # --- the loop -------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg, task, world = self.cfg, self.task, self.world
        data = task.loader(self.step * cfg.grad_accum, self.rank, world)
        for err in getattr(data, "index_errors", []):
            self.report(err, 0, write=self.start_step == 0)
        loader = iter(data)
        tic = time.perf_counter()
        flops = getattr(task, "flops_per_unit", None)  # training FLOPs per counted unit (the prior: per token)
        peak = matmul_peak(self.device) if flops else None
        self.model.train()
        with progress(f"train {task.kind}", total=cfg.steps, unit=f"{task.unit}", start=self.step,
                      show=self.step < cfg.steps) as bar:
            while self.step < cfg.steps:
                if self.stop and world == 1:  # a signal came between two steps, or during set-up
                    if self.step > self.start_step and self.saves.step != self.step:
                        self.save(self.step)
                    return self.interrupted()
                snapshot = rng_snapshot()  # what a save of this step's start would need
                if world > 1:  # one process's stream (saved) goes on as it is; several: each its own noise
                    torch.manual_seed(process_step_seed(cfg.seed, self.rank, self.step))
                updates = self.counters.updates(self.step)  # skipped steps do not move the schedules
                lr = learning_rate(cfg, updates, self.counters.halvings)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                began = time.perf_counter()
                accumulated = self._accumulate(loader, snapshot, updates)
                if accumulated is None:
                    return self.interrupted()
                loss_value, parts, stopping = self._update(*accumulated[:2], updates)
                self.step += 1
                self._warn_if_too_long(time.perf_counter() - began)
                self._record(bar, loss_value, parts, accumulated[2], lr, time.perf_counter() - tic, flops, peak)
                if self.step % cfg.save_every == 0 or self.step == cfg.steps or stopping:
                    self.save(self.step)
                if stopping:
                    return self.interrupted()
        self.accelerator.wait_for_everyone()
        if self.main:
            shown = getattr(task, "summary_metrics", lambda m: m)(self.last_metrics)  # what the task shows
            skipped = self.counters.nonfinite + self.counters.empty  # updates not applied (non-finite, no data)
            summary(f"train-{task.kind}: done", {"steps": self.step, "checkpoint": self.saves.path,
                                                 "metrics": self.saves.metrics_path, "skipped samples": len(self.rejects),
                                                 **({"skipped updates": skipped} if skipped else {}),
                                                 **{k: f"{v:.4g}" for k, v in shown.items()}})
        return TrainResult(self.step, self.saves.path, self.last_metrics, rejects=self.rejects)

    def _accumulate(self, loader, snapshot, updates: int) -> tuple[list[torch.Tensor], dict[str, float], int] | None:
        """Forward and backward over one step's micro-batches: (their losses, the loss parts averaged over
        them, the units counted). None where a signal took the data workers (the last finished step saved).
        The task's loss gets `updates` (steps that changed the weights): its schedules (the dVAE's τ and β)
        keep the learning rate's clock."""
        cfg, model, step, world = self.cfg, self.model, self.step, self.world
        losses, parts, count, datas = [], {}, 0, []
        for _ in range(cfg.grad_accum):  # first the step's micro-batches (the loss may be normalised by all)
            try:
                batch = next(loader)
            except Exception:
                if not self.stop or world > 1:
                    raise
                # The signal also took the data workers with it: drop this unfinished step and
                # save the last finished one, with the random state it ended with.
                self.optimizer.zero_grad(set_to_none=True)
                if step > self.start_step and self.saves.step != step:
                    self.save(step, snapshot)
                return None
            abort = self.counters.count_bad_samples(batch, cfg.max_errors, lambda err: self.report(err, step + 1))
            no_data, aborting = self.synced(float(batch.data is None), float(abort is not None))
            if aborting:
                raise UserError(abort or "another process met too many bad samples in a row; see its "
                                         "messages, fix the shards or raise --max-errors")
            if no_data:  # some process has nothing readable in this micro-batch: all skip it together
                if world > 1 and batch.data is not None and self.main:
                    warn(f"step {step + 1}: another process had no readable sample; micro-batch skipped")
                continue
            count += self.task.count(batch)
            datas.append(batch.data)
        extra = {}
        norm_of = getattr(self.task, "loss_norm", None)
        if norm_of is not None and datas:
            # The task's per-token average spans the whole global batch (§2.2 normalises by the batch's own
            # token count), not each micro-batch: every micro-batch divides by the mean count per micro-batch
            # that has data (skips are the same on every process), so a step with a skipped micro-batch
            # shrinks this part as it shrinks the others (each loss is divided by grad_accum below).
            total = self.synced(float(sum(norm_of(d) for d in datas)))[0]
            extra["norm"] = max(total, 1.0) / (len(datas) * world)
        for micro, data in enumerate(datas):
            sync = micro == len(datas) - 1  # the last one exchanges the gradients, even if a later one was skipped
            if self.sharded:
                distributed.set_gradient_sync(model, sync)
            with (self.accelerator.no_sync(model) if not sync and world > 1 and not self.sharded else nullcontext()):
                with _autocast(self.device, self.autocast_dtype):
                    loss, part = self.task.loss(model, data, updates, **extra)
                self.accelerator.backward(self.scaler.scale(loss / cfg.grad_accum))
            losses.append(loss.detach())
            for k, v in part.items():
                parts[k] = parts.get(k, 0.0) + float(v) / cfg.grad_accum
        return losses, parts, count

    def _update(self, losses: list[torch.Tensor], parts: dict[str, float],
                updates: int) -> tuple[float, dict[str, float], bool]:
        """The optimizer step, or its skip where the loss or a gradient is not finite (on any process).
        Returns (the loss logged, its parts, whether a signal asks to stop after this step)."""
        cfg, scaler, counters, step, world = self.cfg, self.scaler, self.counters, self.step, self.world
        loss_value = float(torch.stack(losses).mean()) if losses else math.nan
        if losses:
            scaler.unscale_(self.optimizer)
        finite = not losses or (math.isfinite(loss_value) and scaler.finite(self.raw))
        # One all-reduce for the verdicts and the numbers logged: with several processes the loss and
        # its parts logged are the means over the processes (each one's is over its own micro-batches).
        shared = self.synced(float(not finite), float(bool(self.stop)), loss_value, *parts.values())
        not_finite, stopping = shared[:2]
        finite = not_finite == 0
        if world > 1:
            loss_value = shared[2] / world
            parts = {k: v / world for k, v in zip(parts, shared[3:])}
        if not losses:  # no readable sample in this step (on every process alike): nothing to update
            counters.empty += 1
        elif finite:
            scaler.update(True)
            if cfg.grad_clip:
                if self.sharded:
                    grad_norm = distributed.clip_grad_norm(self.model.parameters(), cfg.grad_clip)
                else:
                    grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
                parts["grad_norm"] = grad_norm
            self.optimizer.step()
            if self.ema is not None:
                update_ema(self.ema, self.raw.state_dict(), ema_decay_at(cfg.ema_decay, updates))
            counters.nonfinite_in_a_row = 0
        else:  # skip the update: weights, optimizer, EMA and schedules stay as they are
            scaler.update(False)
            if self.powersgd is not None:
                distributed.reset_powersgd(self.powersgd)
            counters.nonfinite += 1
            counters.nonfinite_in_a_row += 1
            if self.main:
                warn(f"step {step + 1}: non-finite loss or gradients; update skipped "
                     f"({counters.nonfinite_in_a_row} in a row, {counters.nonfinite} in all)")
            if counters.nonfinite_in_a_row >= cfg.max_nonfinite:
                raise UserError(f"{counters.nonfinite_in_a_row} non-finite steps in a row at step {step + 1}; "
                                f"lower --lr or use --precision fp32/bf16; {self.saves.kept()}")
        self.optimizer.zero_grad(set_to_none=True)
        if self.powersgd is not None and (ratio := distributed.powersgd_ratio(self.powersgd)) is not None:
            parts["powersgd_ratio"] = round(ratio, 2)  # gradient numbers sent: this many times fewer
        return loss_value, parts, bool(stopping)

    def _warn_if_too_long(self, seconds: float) -> None:
        """Once, on a CPU, a few steps in: say so when the remaining steps would take more than CPU_LONG_RUN_S at
        this speed. The GPU presets' defaults (`paper`: 3 million steps) are years on a laptop, and the progress
        bar's ETA is easy to miss. `seconds`: this update's time (its batches, forward, backward, optimizer
        step), without the saves and evaluations around it."""
        done = self.step - self.start_step
        if self.device.type != "cpu" or not self.main or not 2 <= done <= 11:
            return  # the first step pays for warm-up: the next ten are timed
        self._timed = (self._timed if done > 2 else 0.0) + seconds
        if done < 11:
            return
        remaining = self._timed / 10 * (self.cfg.steps - self.step)
        if remaining > CPU_LONG_RUN_S:
            warn(f"at this speed the remaining {self.cfg.steps - self.step:,} steps take about {_duration(remaining)} "
                 f"on this CPU; pass --steps N for a shorter run (a rerun with a larger --steps continues it), or "
                 f"a smaller --preset (the README's 'What the CPU presets reach' lists ones sized for a CPU)")

    def _record(self, bar, loss_value: float, parts: dict[str, float], count: int, lr: float, elapsed: float,
                flops: float | None, peak: float | None) -> None:
        """After step `self.step`: the progress bar, metrics.jsonl, and the validation run when due."""
        cfg, step = self.cfg, self.step
        self.last_metrics = {"loss": loss_value, **parts}
        speed = {}
        if peak:  # on a GPU: the model FLOPs utilisation so far (the rate is the mean since the bar started)
            speed["mfu"] = round(model_flops_utilisation(bar.rate, flops, self.world, peak), 4)
        bar.advance(1, rate_count=count * self.world, loss=loss_value, **speed)
        if self.main and (step % cfg.log_every == 0 or step == cfg.steps):
            runfiles.append(self.saves.metrics_path, {
                "step": step, "split": "train", "loss": loss_value, **parts, "lr": lr,
                "skipped": self.counters.nonfinite + self.counters.empty, "elapsed": round(elapsed, 3),
                f"{self.task.unit}_per_s": round(bar.rate, 2), **speed})
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            result = self.evaluate(step)
            self.last_metrics.update(result)
            if self.main and result:
                runfiles.append(self.saves.metrics_path, {"step": step, "split": "val", **result})

    # --- checkpoints, evaluation, bad samples ---------------------------------------------------------------

    def save(self, at: int, rng: dict[str, Any] | None = None) -> Path | None:
        model, main, ema = self.model, self.main, self.ema
        if self.sharded:  # every process sends its shards; the main process gets the whole tensors
            weights = distributed.full_model_state(model)
            opt_state = distributed.full_optimizer_state(model, self.optimizer)
            ema_full = distributed.gather(ema, main) if ema is not None else None
        if not main:
            return None
        if not self.sharded:
            weights, opt_state, ema_full = self.raw.state_dict(), self.optimizer.state_dict(), ema
        bad = (first_nonfinite(weights, "weights") or first_nonfinite(ema_full or {}, "ema")
               or first_nonfinite(opt_state.get("state", {}), "optimizer"))
        if bad:
            raise UserError(f"refusing to save step {at}: {bad} holds NaN or Inf; {self.saves.kept()}; lower --lr "
                            "or use --precision fp32/bf16")
        state = {"optimizer": opt_state, "scaler": self.scaler.state_dict(), "step": at, **self.counters.state(),
                 "rng": rng_state(rng), "data_position": at * self.cfg.grad_accum}
        extra = getattr(self.task, "extra_json", None)  # files a task's checkpoints also carry (the CLIP's)
        return self.saves.save(at, model_config=self.task.model_config(), weights=weights, ema=ema_full,
                               training_state=state, meta=self.task.meta(),
                               extra_json=extra() if extra is not None else None)

    def evaluate(self, at: int) -> dict[str, float]:
        cfg, device, raw, ema, counters = self.cfg, self.device, self.raw, self.ema, self.counters
        # Evaluation must not disturb the training RNG (a resumed run would diverge otherwise).
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            if ema is not None:
                backup = {k: v.detach().clone() for k, v in raw.state_dict().items()}
                raw.load_state_dict({k: v.to(backup[k].dtype) for k, v in ema.items()})
            raw.eval()
            with torch.no_grad(), _autocast(device, self.autocast_dtype):
                result = self.task.evaluate(raw, at)
            raw.train()
            if ema is not None:
                raw.load_state_dict(backup)
        val = result.get("val_loss")
        if cfg.schedule == "plateau" and val is not None:
            if val < counters.best - 1e-4:
                counters.best, counters.bad_evals = val, 0
            else:
                counters.bad_evals += 1
                if counters.bad_evals >= cfg.plateau_patience and counters.halvings < cfg.plateau_halvings:
                    counters.halvings, counters.bad_evals = counters.halvings + 1, 0
        return result

    def report(self, err: dict, at: int, write: bool = True) -> None:
        self.rejects.append(err)
        if self.main:
            warn(f"skipping {err['shard']}:{err['key']}: {err['reason']}")
            if write:
                runfiles.append(self.saves.rejects_path, {"step": at, **err})

    def synced(self, *flags: float) -> list[float]:
        """Per-process flags summed over the processes (one small all-reduce), so all decide alike."""
        if self.world == 1:
            return list(flags)
        t = torch.tensor(flags, dtype=torch.float32, device=self.device)
        return self.accelerator.reduce(t, reduction="sum").tolist()

    def interrupted(self) -> TrainResult:
        if self.main:
            info(f"stopped by signal {self.stop.signals[0]} after step {self.step}; "
                 + (f"checkpoint: {self.saves.path}" if self.saves.path else "no checkpoint was saved yet"))
        self.accelerator.wait_for_everyone()
        return TrainResult(self.step, self.saves.path, self.last_metrics,
                           stopped_by=signal.Signals(self.stop.signals[0]).name, rejects=self.rejects)


CPU_LONG_RUN_S = 6 * 3600  # a CPU run projected beyond this gets one warning (`_warn_if_too_long`)


def _duration(seconds: float) -> str:
    for unit, size in (("years", 365 * 86400), ("days", 86400), ("hours", 3600)):
        if seconds >= 2 * size:
            return f"{seconds / size:,.0f} {unit}"
    return f"{seconds / 3600:.1f} hours"


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
