"""Training state that must survive a resume: the random generators (as plain values a `weights_only`
checkpoint load accepts), seeding, the run's counters, the EMA update, the check that nothing saved holds NaN
or Inf, and the model-config comparison that refuses a changed model."""
from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch


def rng_snapshot() -> dict[str, Any]:
    """The generators' states as Python objects (cheap: taken at the start of every step)."""
    snap = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        snap["cuda"] = torch.cuda.get_rng_state_all()
    return snap


def rng_state(snapshot: dict[str, Any] | None = None) -> dict[str, Any]:
    """The generators' states (now, or of a snapshot) as plain values `torch.load(weights_only=True)` reads."""
    snap = snapshot or rng_snapshot()
    _, key, pos, has_gauss, gauss = snap["numpy"]
    state = {"torch": snap["torch"], "python": json.dumps(snap["python"]),
             "numpy": json.dumps({"key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                                  "gauss": float(gauss)})}
    if "cuda" in snap:
        state["cuda"] = snap["cuda"]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = json.loads(state["numpy"])
    if isinstance(npy, list):  # checkpoints before the position was kept: the key alone
        npy = {"key": npy, "pos": 624, "has_gauss": 0, "gauss": 0.0}
    np.random.set_state(("MT19937", np.array(npy["key"], dtype=np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def process_step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of process `rank`'s in-model noise (the dVAE's relaxation, dropout) at `step`, with several
    processes: each draws its own (one shared stream would give every process the same noise, as if the global
    batch were one process's), and a resumed run draws what the uninterrupted one did, with no state saved."""
    digest = hashlib.blake2b(f"{seed}:{rank}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def config_diff(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k)!r} != now {current.get(k)!r}" for k in keys
            if saved.get(k) != current.get(k)]


@dataclass
class Counters:
    """Where a run stands besides its step; saved in every checkpoint's training state under these names."""
    halvings: int = 0  # plateau schedule: times the learning rate was halved
    best: float = math.inf  # plateau schedule: the best validation loss so far
    bad_evals: int = 0  # evaluations since `best` last improved
    nonfinite: int = 0  # steps skipped for a non-finite loss or gradient
    empty: int = 0  # steps skipped for want of a readable sample
    nonfinite_in_a_row: int = 0
    bad_in_a_row: int = 0  # unreadable samples in a row

    def updates(self, step: int) -> int:
        """Of `step` steps, those that updated the weights: the schedules' clock."""
        return step - self.nonfinite - self.empty

    def state(self) -> dict[str, Any]:
        return {**asdict(self), "best": self.best if math.isfinite(self.best) else None}  # no Inf in a checkpoint

    def count_bad_samples(self, batch, max_errors: int, report: Callable[[dict], None]) -> str | None:
        """Report each unreadable sample of `batch` (a data.loader.Batch) and count failures in a row, in
        sample order; the message to stop with once `max_errors` come in a row, else None."""
        errors = iter(batch.errors)
        order = batch.ok if batch.ok is not None else [False] * len(batch.errors) + [True] * len(batch.keys)
        for ok in order:
            if ok:
                self.bad_in_a_row = 0
                continue
            err = next(errors)
            self.bad_in_a_row += 1
            report(err)
            if self.bad_in_a_row >= max_errors:
                return (f"{self.bad_in_a_row} bad samples in a row (last: {err['shard']}:{err['key']}: "
                        f"{err['reason']}); fix the shards or raise --max-errors")
        return None

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Counters:
        """From a checkpoint's training state; KeyError where a field every version wrote is missing."""
        return cls(halvings=int(state["halvings"]), bad_evals=int(state["bad_evals"]),
                   best=math.inf if state["best"] is None else float(state["best"]),
                   nonfinite=int(state["nonfinite"]), empty=int(state.get("empty", 0)),
                   nonfinite_in_a_row=int(state.get("nonfinite_in_a_row", 0)),
                   bad_in_a_row=int(state.get("bad_in_a_row", 0)))


@torch.no_grad()
def update_ema(ema: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], decay: float) -> None:
    """ema ← decay · ema + (1 − decay) · weights, in fp32; integer buffers are copied."""
    for k, v in weights.items():
        if v.is_floating_point():
            ema[k].lerp_(v.float(), 1 - decay)
        else:
            ema[k].copy_(v)


def first_nonfinite(tree: Any, name: str = "") -> str | None:
    """The name of the first floating-point tensor holding NaN or Inf in nested dicts/lists, else None."""
    if isinstance(tree, torch.Tensor):
        return name if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else None
    if isinstance(tree, float):
        return name if not math.isfinite(tree) else None
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for k, v in items:
        found = first_nonfinite(v, f"{name}.{k}" if name else str(k))
        if found:
            return found
    return None
