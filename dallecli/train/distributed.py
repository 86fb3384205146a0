"""Data-parallel strategies for the training loop: sharded parameters (FSDP2) and compressed gradients
(PowerSGD).

`--strategy ddp` (the default) replicates the model on every process and all-reduces the gradients
(Accelerate's DDP wrapping). `--strategy fsdp` shards parameters, gradients and optimizer state over the
processes with `torch.distributed.fsdp.fully_shard`: each transformer block is one unit (gathered just
before it runs, freed after), the root holds the rest (embeddings, final norm, heads). Checkpoints keep
the DDP format: full state dicts are gathered to the main process for saving and split again on resume.

`--powersgd-rank R` registers `powerSGD_hook` on the DDP model: every weight matrix's gradient is sent
as a rank-R factorisation instead of in full, with error feedback (what the approximation left out is
added to the next step's gradient). The first steps use the exact all-reduce.

Everything torch.distributed is imported lazily: single-process training never pays for it.
"""
from __future__ import annotations

import warnings

from typing import Any, Iterable

import torch
from torch import nn

from dallecli.console import UserError

STRATEGIES = ("ddp", "fsdp")
POWERSGD_DEFAULT_START = 1000  # PowerSGDState's own default for start_powerSGD_iter


def check_options(strategy: str, powersgd_rank: int | None, precision: str) -> None:
    """Refuse flag combinations that cannot run, with one line naming the flags."""
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy must be ddp or fsdp (got {strategy})")
    if powersgd_rank is not None and powersgd_rank < 1:
        raise UserError(f"--powersgd-rank must be at least 1 (got {powersgd_rank})")
    if powersgd_rank is not None and strategy == "fsdp":
        raise UserError("--powersgd-rank needs --strategy ddp: FSDP reduce-scatters gradient shards, "
                        "which PowerSGD cannot compress")
    if strategy == "fsdp" and precision == "fp16":
        # Per-resblock scaling inspects and rescales every parameter gradient as one plain tensor; FSDP's
        # gradients are shards (DTensors).
        raise UserError("--precision fp16 with --strategy fsdp is not supported; use bf16")


def is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded tensor (the tensor itself when it is not sharded)."""
    if type(t) is torch.Tensor:  # the usual case, without importing torch.distributed
        return t
    return t.to_local() if is_dtensor(t) else t


# --- FSDP2 ---------------------------------------------------------------------------------------------------

def shard_model(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """Shard `model` (already on `device`) over all `world` processes, in place: each of `model.blocks`
    is its own unit, then the root. Must run before the optimizer is built: the optimizer has to hold
    the sharded parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for block in getattr(model, "blocks", []):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # The root returns its text and image logits as views of one tensor. FSDP2 warns (every process, every
    # run) that an in-place op on such a view would skip its pre-backward hook; the loss only reads them
    # (`prior_loss`), and the sharded losses equal DDP's bit for bit (tests/test_distributed.py).
    warnings.filterwarnings("ignore", message=rf"FSDP2-wrapped module \({type(model).__name__}\) returned a view",
                            category=UserWarning)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """FSDP's `no_sync`: with accumulation, reduce-scatter the gradients on the last micro-batch only."""
    model.set_requires_gradient_sync(enabled)


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Gathered onto the main process's CPU (the others get nothing): one copy of the model in host memory.
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights, as `model.state_dict()` of the plain model (collective: every process
    calls it; only the main process gets the tensors)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter, in the order `optimizer.state_dict()` numbers them."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The unsharded optimizer state in `optimizer.state_dict()`'s format (parameters numbered, not
    named), so a checkpoint reads the same whichever strategy wrote it. Collective, as `full_model_state`."""
    if not optimizer.state:
        # No update yet (every step so far skipped): nothing to gather. The state-dict helpers would
        # initialise the state with a zero-gradient step, which a DDP run never takes.
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    named = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not named:  # not the main process
        return {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    state = sorted(named["state"].items(), key=lambda kv: index[kv[0]])
    return {"state": {index[name]: value for name, value in state},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in named["param_groups"]]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state (`optimizer.state_dict()` format, every process holds it) into the
    sharded optimizer: each process keeps its own slices."""
    if not state.get("state"):
        optimizer.load_state_dict(state)  # hyperparameters only: nothing to shard
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    groups = state["param_groups"]
    if len(groups) != len(optimizer.param_groups) or sum(len(g["params"]) for g in groups) != len(names):
        raise ValueError("the optimizer state does not match this model's parameter groups")
    named = {"state": {names[int(i)]: value for i, value in state["state"].items()},
             "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]} for group in groups]}
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` (the same on every process) split as `like` is, without communication."""
    if not is_dtensor(like):
        return full.to(like.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def gather(tensors: dict[str, torch.Tensor], main: bool) -> dict[str, torch.Tensor] | None:
    """Sharded tensors made whole on the main process's CPU, one at a time (collective)."""
    out = {}
    for k, v in tensors.items():
        full = v.full_tensor() if is_dtensor(v) else v
        if main:
            out[k] = full.detach().cpu()
    return out if main else None


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> float:
    """Clip to a global norm: over sharded gradients the norm is reduced across processes."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return float(norm.full_tensor() if is_dtensor(norm) else norm)


# --- PowerSGD ------------------------------------------------------------------------------------------------

def powersgd_start(steps: int, warmup: int, resumed_at: int) -> int:
    """The step from which gradients are compressed, counted from this process's first step.

    The early steps are the most sensitive to inexact gradients, so they use the exact all-reduce: no
    fewer than the warm-up steps, and about a tenth of the run, capped at PowerSGDState's default of
    1,000. The hook's own minimum is 2 (DDP rebuilds its gradient buckets after the first step, and the
    error feedback is kept per bucket). A resumed run counts from the checkpoint's step: past the start,
    it compresses again after the 2-step minimum."""
    start = max(warmup, min(steps // 10, POWERSGD_DEFAULT_START))
    return max(2, start - resumed_at)


def register_powersgd(ddp_model: nn.Module, rank: int, start: int):
    """Compress `ddp_model`'s gradient all-reduce to rank `rank` from step `start`; returns the
    PowerSGDState (`compressed` tells whether it has compressed yet)."""
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, powerSGD_hook

    import torch.distributed as dist

    state = PowerSGDState(process_group=None, matrix_approximation_rank=rank, start_powerSGD_iter=start,
                          use_error_feedback=True, warm_start=True)
    hook = powerSGD_hook if dist.get_backend() == "nccl" else _one_bucket_at_a_time(powerSGD_hook)
    ddp_model.register_comm_hook(state, hook)
    return state


def _one_bucket_at_a_time(hook):
    """`hook`, but each gradient bucket's all-reduces finish before the next bucket's begin.

    The hook chains three all-reduces per bucket (uncompressed tensors, P, Q), the later ones started
    from completion callbacks. gloo runs those callbacks on its own threads, so with two buckets in flight
    the processes could start their all-reduces in different orders: a collective mismatch that aborts
    or hangs. (NCCL runs them in order on the calling thread.) Costs the overlap between buckets, on
    CPU processes only."""
    last = None

    def ordered(state, bucket):
        nonlocal last
        if last is not None:
            last.wait()
        last = hook(state, bucket)
        return last

    return ordered


def powersgd_ratio(state) -> float | None:
    """How many times fewer gradient numbers were sent in the compressed steps so far (None before the
    first compressed step)."""
    if not state.total_numel_after_compression:
        return None
    return state.total_numel_before_compression / state.total_numel_after_compression


def reset_powersgd(state) -> None:
    """Forget the error feedback and the warm-start factors: after a non-finite step they hold NaN or Inf
    that would otherwise be added to every later gradient."""
    state.error_dict.clear()
    state.p_memory_dict.clear()
    state.q_memory_dict.clear()
