"""What the training loop (train/loop.py) asks of a task — the dVAE, the prior, CLIP — and what a run returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

import torch
from torch import nn

from dallecli import checkpoint
from dallecli.data.loader import Batch


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
    # `updates`: the updates made so far (skipped steps not counted), the clock of the task's own schedules.
    # A task with a `loss_norm(data) -> float` method (the prior: its text tokens) also gets `norm=`: that
    # quantity's global-batch mean per micro-batch, to divide by instead of each micro-batch's own.
    def loss(self, model: nn.Module, data: Any, updates: int) -> tuple[torch.Tensor, dict[str, float]]: ...
    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]: ...
    def check_resume(self, ck: checkpoint.Checkpoint) -> None: ...
    # Optional: `protected_steps() -> dict[int, str]`, checkpoints that --keep must not prune (step → why).


@dataclass
class TrainResult:
    step: int
    checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    stopped_by: str | None = None
    rejects: list[dict] = field(default_factory=list)  # bad samples skipped: {"shard", "key", "reason"}


def exit_code_for(result: TrainResult) -> int:
    """128 + signal number, as shells report it: 143 for SIGTERM, 130 for SIGINT."""
    return {"SIGTERM": 143, "SIGINT": 130}.get(result.stopped_by or "", 0)
