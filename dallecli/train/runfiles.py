"""The run's step-stamped JSONL files (metrics.jsonl, rejects.jsonl): appended as training goes, cut back to the
resumed step on a resume; a write that fails (disk full) becomes one clear error that says the checkpoint is intact."""
from __future__ import annotations

import json
import os
from pathlib import Path

from dallecli.console import UserError


def trim_jsonl(path: Path, resume_step: int) -> Path:
    """Keep the records of a step-stamped JSONL file up to `resume_step` (the later ones will be redone).
    A line cut off by a crash is dropped."""
    if path.exists():
        kept = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= resume_step:
                kept.append(line)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise write_error(path, exc) from None
    return path


def write_error(path: Path, exc: OSError) -> UserError:
    return UserError(f"cannot write {path}: {exc.strerror or exc} (disk full or not writable?); the last "
                     "checkpoint is intact: free space and rerun the same command to resume")


def append(path: Path, record: dict) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as exc:
        raise write_error(path, exc) from None
