"""Training state that must survive a resume: the random generators (as plain values a `weights_only`
checkpoint load accepts), seeding, and the model-config comparison that refuses a changed model."""
from __future__ import annotations

import json
import random
from typing import Any

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


def config_diff(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k)!r} != now {current.get(k)!r}" for k in keys
            if saved.get(k) != current.get(k)]
