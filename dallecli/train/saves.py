"""A training run's checkpoint folder, as the loop (train/loop.py) uses it: which checkpoint a run resumes
from, and what a save does around `checkpoint.save` — `--fresh` replacing the earlier run at the new run's
first save, `--keep` pruning while sparing the steps the run's codes and prior were made with, and the words
for what a failure leaves behind (DESIGN.md, "Checkpoints").

The folder's other files describe its latest checkpoint, so they change with a save, not before:
train_config.json (the settings a rerun continues with, `commands.common.resumed_run`) is written at each
save; a `--fresh` run over an earlier one logs into hidden .fresh-*.jsonl files that replace metrics.jsonl and
rejects.jsonl at its first save. A run stopped before it saved leaves the earlier run's files as they were."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from dallecli import checkpoint
from dallecli.config import write_json_atomic
from dallecli.console import UserError, info, warn
from dallecli.train import runfiles
from dallecli.train.task import Task

LOGS = ("metrics.jsonl", "rejects.jsonl")


class RunCheckpoints:
    """The checkpoints of one `train` call in folder `out`, written by the main process (`main`); `keep`
    is --keep. `step` and `path` name the last checkpoint this run saved or resumed from (None before)."""

    def __init__(self, task: Task, out: Path, keep: int, main: bool, train_config: dict):
        self.task, self.out, self.keep, self.main, self.train_config = task, out, keep, main, train_config
        self.step: int | None = None
        self.path: Path | None = None
        self.replacing = False  # --fresh: the first save of the new run removes the earlier run's checkpoints
        self.began = time.time()  # files in `out` older than this that the task names are the earlier run's
        self.told: set[int] = set()  # protected steps already reported as kept beyond --keep
        self.staged = False  # a --fresh run logs beside the earlier run's logs until its first save
        self.metrics_path = self.rejects_path = None

    def latest(self, fresh: bool, wait_for_everyone: Callable[[], None]) -> Path | None:
        """The checkpoint to resume from: the newest complete one, or None for a new run (or `fresh`). The
        main process first finishes a re-save cut between its two renames; the others wait for it."""
        out = self.out
        if self.main and out.is_dir():
            checkpoint.recover(out)
        wait_for_everyone()
        self.replacing = fresh
        if not fresh:
            return checkpoint.latest(out) if out.exists() else None
        if self.main and out.exists() and checkpoint.latest(out) is not None:
            self.staged = True
            info(f"--fresh: starting over; the checkpoints in {out} will be replaced as the new run saves")
            needed = self._asked_protected()
            if needed:
                # (`dalle train-dvae --fresh` refuses this before it gets here; a library caller is told)
                warn(f"--fresh also replaces {', '.join(f'step {s} ({why})' for s, why in sorted(needed.items()))}"
                     ": after this run, re-encode (`dalle encode --overwrite`) and retrain the prior "
                     "(`dalle train-prior --fresh`)")
        return None

    def resumed(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def open_logs(self, step: int) -> None:
        """metrics.jsonl and rejects.jsonl cut back to `step` (the rows after it will be redone), or, for a
        --fresh run over an earlier one, empty staged ones (main process only)."""
        cut = step if step > 0 else -1
        if not self.staged:  # a --fresh run that was stopped before its first save left these
            for name in LOGS:
                (self.out / f".fresh-{name}").unlink(missing_ok=True)
        paths = [self.out / (f".fresh-{name}" if self.staged else name) for name in LOGS]
        self.metrics_path, self.rejects_path = (runfiles.trim_jsonl(p, -1 if self.staged else cut) for p in paths)

    def save(self, at: int, **contents: Any) -> Path:
        """`checkpoint.save(out, at, **contents)`; then, after a --fresh run's first save, the earlier run's
        checkpoints and the files its task names (`run_files`, e.g. the dVAE's recon-*.png) go; then --keep."""
        path = checkpoint.save(self.out, at, kind=self.task.kind, **contents)
        if self.replacing:  # --fresh: none of the earlier run outlives the new run's first save
            checkpoint.remove_all_but(self.out, at)
            for pattern in getattr(self.task, "run_files", ()):
                for old in self.out.glob(pattern):
                    if old.is_file() and old.stat().st_mtime < self.began:
                        old.unlink(missing_ok=True)
            self.replacing = False
        checkpoint.prune(self.out, self.keep, self._protected())
        self.step, self.path = at, path
        try:
            if self.staged:  # the new run's logs replace the earlier run's
                for staged, name in zip((self.metrics_path, self.rejects_path), LOGS):
                    if staged.exists():
                        os.replace(staged, self.out / name)
                    else:
                        (self.out / name).unlink(missing_ok=True)
                self.metrics_path, self.rejects_path = (self.out / name for name in LOGS)
                self.staged = False
            write_json_atomic(self.out / "train_config.json", self.train_config)
        except OSError as exc:
            raise runfiles.write_error(self.out / "train_config.json", exc) from None
        return path

    def kept(self) -> str:
        """What a failure leaves, in words: the last checkpoint, or none."""
        return f"the last checkpoint ({self.path}) is intact" if self.path else "no checkpoint was saved yet"

    def _asked_protected(self) -> dict[int, str]:
        """The task's `protected_steps()` (step → why), or none where it has no such method or cannot tell."""
        asked = getattr(self.task, "protected_steps", None)
        if asked is None:
            return {}
        try:
            return asked()
        except Exception as exc:  # noqa: BLE001 — advisory: a bad codes manifest must not stop a save
            if -1 not in self.told:
                self.told.add(-1)
                warn(f"could not tell which checkpoints the run's codes and prior need ({exc}); --keep prunes "
                     "as usual")
            return {}

    def _protected(self) -> set[int]:
        """The steps the task asks --keep to spare (said once each, when one falls outside the newest --keep)."""
        steps = self._asked_protected()
        complete = [s for s, _ in checkpoint.complete_steps(self.out)]
        older = set(complete[:-self.keep])
        for step, why in steps.items():
            if step in older and step not in self.told:
                self.told.add(step)
                info(f"keeping step {step} beyond --keep {self.keep}: {why}")
        return set(steps)


def does_not_fit(ck: checkpoint.Checkpoint, exc: Exception) -> UserError:
    """The error for a checkpoint whose weights or training state the model or optimizer refused."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return UserError(f"cannot resume {ck.path}: its weights or training state do not fit this model "
                     f"({first}); resume from another checkpoint or use --fresh")
