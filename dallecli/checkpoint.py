"""Checkpoints: atomic, self-describing folders (DESIGN.md, "Checkpoints").

    ROOT/step-00001000/
        model.safetensors      weights
        ema.safetensors        EMA weights, when kept
        config.json            {"format", "kind", "step", "fingerprint", "model": {...}, "meta": {...}}
        training_state.pt      optimizer, scheduler, scaler, RNG, data position (tensors and plain values only)
        DONE                   empty, written last: a folder without it does not exist for any reader

A save writes into a hidden temporary folder and renames it into place, so a crash at any point
leaves every earlier checkpoint and "latest" intact. Pruning runs only after the new folder is complete,
and hides a folder (renames it) before deleting it, so no reader ever sees half a checkpoint. A failed
write (disk full, unwritable folder) is one clear error, `CheckpointWriteError`.
Nothing here unpickles untrusted bytes: weights go through safetensors, configs through JSON and the
training state through `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dallecli.config import fsync_dir, read_json, usual_mode, write_json_atomic
from dallecli.console import UserError

FORMAT = 1
KINDS = ("dvae", "prior", "clip")
STEP_RE = re.compile(r"^step-(\d{8})$")
MAKER = {"dvae": "dalle train-dvae", "prior": "dalle train-prior", "clip": "dalle train-clip"}


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (disk full, unwritable folder): one clear line; still an OSError."""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def complete_steps(root: Path) -> list[tuple[int, Path]]:
    """Every complete checkpoint under `root` as (step, path), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = STEP_RE.match(child.name)
        if m and child.is_dir() and (child / "DONE").is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest(root: Path) -> Path | None:
    """The highest step with a completion marker (never chosen by modification time)."""
    steps = complete_steps(root)
    return steps[-1][1] if steps else None


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _plain(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights): store an independent copy of each.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def weights_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """16 hex digits of a SHA-256 over the tensors (names, dtypes, shapes and bytes, in name order):
    the same weights give the same fingerprint, however and wherever the file was written."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save(
    root: Path,
    step: int,
    *,
    kind: str,
    model_config: dict[str, Any],
    weights: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor] | None = None,
    training_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    keep: int | None = None,
    extra_json: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint for `step` atomically, then prune to the newest `keep` (if given).
    `extra_json`: more JSON files for the folder, by name (a CLIP's open_clip_config.json), written before DONE."""
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}")
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        recover(root)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        # One metadata key only: safetensors writes its metadata map in a random order per process, and
        # the same weights must give the same bytes (what `fingerprint` hashes is the content anyway).
        fingerprint = None  # of the weights used for inference: the EMA ones when kept
        for name, tensors in (("model.safetensors", weights), ("ema.safetensors", ema)):
            if tensors is not None:
                plain = _plain(tensors)
                save_file(plain, tmp / name, metadata={"kind": kind})
                usual_mode(tmp / name)  # safetensors makes 0600 files
                _fsync_file(tmp / name)
                fingerprint = weights_fingerprint(plain)
                del plain  # one host copy at a time
        if training_state is not None:
            with open(tmp / "training_state.pt", "wb") as f:  # a file of ours: write errors are OSErrors
                torch.save(training_state, f)
            _fsync_file(tmp / "training_state.pt")
        write_json_atomic(tmp / "config.json", {
            "format": FORMAT,
            "kind": kind,
            "step": step,
            # The content hash of the weights used for inference: code shards and samples record it.
            "fingerprint": fingerprint,
            "model": model_config,
            "meta": meta or {},
        })
        for name, data in (extra_json or {}).items():
            write_json_atomic(tmp / name, data)
        (tmp / "DONE").touch()
        _fsync_file(tmp / "DONE")
        fsync_dir(tmp)
        if final.exists():  # a re-save of the same step: move the old one aside first (`recover` undoes
            old = root / f".old-{final.name}-{os.getpid()}"  # a crash between the two renames)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = _io_reason(exc)
        if reason is None:
            raise
        try:
            before = latest(root)
        except OSError:
            before = None
        raise CheckpointWriteError(
            f"cannot write checkpoint {final}: {reason} (disk full or not writable?); "
            f"{f'the previous checkpoint {before} is intact' if before else 'no earlier checkpoint exists'}; "
            "free space (or fix permissions) and rerun the same command to resume") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        prune(root, keep)
    return final


def _io_reason(exc: BaseException) -> str | None:
    """Why a write failed (`No space left on device`), if it was an I/O error, else None. The OS error may
    come through Python, through safetensors' Rust (a SafetensorError) or hidden behind the RuntimeError
    torch's zip writer raises while closing after it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            return exc.strerror or str(exc)
        if isinstance(exc, SafetensorError) and "I/O error" in str(exc):
            m = re.search(r"os error (\d+)", str(exc))
            return os.strerror(int(m.group(1))) if m else str(exc).strip()[:200]
        exc = exc.__cause__ or exc.__context__
    return None


def remove(path: Path) -> None:
    """Delete a checkpoint folder safely: hide it first (one atomic rename), then delete the files.
    A crash in between leaves a hidden folder that the next prune clears, never a visible half."""
    path = Path(path)
    hidden = path.parent / f".del-{path.name}-{os.getpid()}"
    if hidden.exists():
        shutil.rmtree(hidden, ignore_errors=True)
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def remove_all_but(root: Path, step: int) -> list[Path]:
    """Delete every complete checkpoint but `step`'s: the earlier run that `--fresh` replaces, at its first save.
    Highest first: cut short, it leaves `step` the latest (what a rerun resumes), never an older run's."""
    removed = []
    for s, path in reversed(complete_steps(root)):
        if s != step:
            remove(path)
            removed.append(path)
    return removed


def prune(root: Path, keep: int, protect: frozenset[int] | set[int] = frozenset()) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (and those of the `protect` steps), and stale
    temporary folders."""
    if keep < 1:
        raise UserError(f"--keep must be at least 1 (got {keep})")
    removed = []
    for step, path in complete_steps(root)[:-keep]:
        if step in protect:
            continue
        remove(path)
        removed.append(path)
    recover(root)
    for child in Path(root).iterdir():
        if child.name.startswith((".tmp-step-", ".old-step-", ".del-step-")):
            pid = child.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(child, ignore_errors=True)
    return removed


def recover(root: Path) -> list[Path]:
    """Finish a re-save that a crash interrupted between its two renames: if `step-X` is missing but a
    dead process left a complete `.tmp-step-X-PID` (the new one) or `.old-step-X-PID` (the one it replaced),
    put it back in place. Returns the folders restored."""
    root = Path(root)
    if not root.is_dir():
        return []
    restored = []
    hidden = sorted((c for c in root.iterdir() if c.name.startswith((".tmp-step-", ".old-step-"))),
                    key=lambda c: not c.name.startswith(".tmp-"))  # the newer (tmp) first
    for child in hidden:
        name, _, pid = child.name[1:].partition("-")[2].rpartition("-")
        if not (STEP_RE.match(name) and pid.isdigit()) or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        final = root / name
        if not final.exists() and (child / "DONE").is_file() and (child / "config.json").is_file():
            try:
                os.replace(child, final)
                restored.append(final)
            except OSError:
                pass
    return restored


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint folder, validated: its kind, step and config are known."""

    path: Path
    kind: str
    step: int
    fingerprint: str
    model_config: dict[str, Any]
    meta: dict[str, Any]

    def weights(self, ema: bool = True, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The EMA weights when present and asked for, else the raw ones."""
        name = "ema.safetensors" if ema and (self.path / "ema.safetensors").is_file() else "model.safetensors"
        return _load_tensors(self.path / name, device)

    def has_ema(self) -> bool:
        return (self.path / "ema.safetensors").is_file()

    def ema_weights(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor] | None:
        return _load_tensors(self.path / "ema.safetensors", device) if self.has_ema() else None

    def training_state(self) -> dict[str, Any]:
        path = self.path / "training_state.pt"
        if not path.is_file():
            raise UserError(f"checkpoint {self.path} has no training state; it can be used, not resumed")
        return load_torch_state(path)


def _load_tensors(path: Path, device) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"checkpoint file missing: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint file is empty (0 bytes): {path}; delete the folder and resume from another")
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"checkpoint file is corrupt or truncated: {path} ({first}); delete that step folder "
                        f"({path.parent}) to fall back to the one before it, or pass another checkpoint") from None


def load_torch_state(path: Path) -> dict[str, Any]:
    """Load a training-state file with `weights_only=True`: plain containers and tensors, never code."""
    import pickle

    path = Path(path)
    if path.stat().st_size == 0:
        raise UserError(f"training state is empty (0 bytes): {path}; delete the folder and resume from another")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError… for bad bytes
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc).lower():
            raise UserError(f"refusing to load {path}: not a plain tensor file, loading it would run code "
                            f"({first[:160]})") from None
        raise UserError(f"training state {path} is corrupt or truncated ({first[:160]}); "
                        "delete the folder and resume from another") from None


def resolve(path: Path, kind: str) -> Path:
    """A step folder, or a folder of step folders (its latest complete one)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no {kind} checkpoint at {path}; make one with `{MAKER.get(kind, 'dalle')}`")
    if (path / "config.json").is_file() or STEP_RE.match(path.name):
        if not (path / "DONE").is_file():
            raise UserError(f"checkpoint {path} is incomplete (no DONE marker): it was interrupted while "
                            "saving; use an earlier step or the folder above it")
        return path
    found = latest(path)
    if found is None:
        raise UserError(f"no complete {kind} checkpoint under {path}; make one with `{MAKER.get(kind, 'dalle')}`")
    return found


def load(path: Path, kind: str) -> Checkpoint:
    """Open and validate a checkpoint of `kind`; the wrong kind or a bad config is one clear error."""
    folder = resolve(path, kind)
    config = read_json(folder / "config.json", what="checkpoint config")
    if not isinstance(config, dict) or "kind" not in config:
        raise UserError(f"{folder}/config.json is not a dalle checkpoint config (no 'kind' field)")
    if config["kind"] != kind:
        raise UserError(f"{folder} is a {config['kind']} checkpoint, but a {kind} checkpoint was expected "
                        f"(kind: {config['kind']} != {kind})")
    if config.get("format") != FORMAT:
        raise UserError(f"{folder}: checkpoint format {config.get('format')} is not supported (expected {FORMAT})")
    for key in ("step", "fingerprint", "model"):
        if key not in config:
            raise UserError(f"{folder}/config.json lacks the field '{key}'")
    return Checkpoint(path=folder, kind=kind, step=int(config["step"]), fingerprint=config["fingerprint"],
                      model_config=config["model"], meta=config.get("meta", {}))


def load_weights_into(model: torch.nn.Module, ck: Checkpoint, ema: bool = True) -> None:
    """`ck`'s weights (EMA by default) into `model`, built from its config.json: a missing, extra or
    differently shaped tensor (a config edited, or weights from another model) is one clear error."""
    try:
        missing, unexpected = model.load_state_dict(ck.weights(ema=ema), strict=False)
    except RuntimeError as exc:  # shapes that differ: torch lists every one
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        raise UserError(f"{ck.path}: the weights do not fit the {ck.kind} its config.json describes "
                        f"({(lines or [str(exc).splitlines()[0]])[0][:200]}); use a checkpoint whose config.json "
                        "was not edited") from None
    if missing or unexpected:
        raise UserError(f"{ck.path}: the weights do not match the {ck.kind} its config.json describes "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def step_with_fingerprint(root: Path, fingerprint: str | None) -> Path | None:
    """The newest complete checkpoint under `root` whose weights have `fingerprint` (from its config.json: no
    weights are read), or None."""
    if fingerprint is None:
        return None
    for _, folder in reversed(complete_steps(root)):
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and config.get("fingerprint") == fingerprint:
            return folder
    return None


def prior_trained_with(prior: Path | None, key: str, fingerprint: str | None) -> Checkpoint | None:
    """The latest prior checkpoint under `prior` if its meta records `key` == `fingerprint` (the codes'
    dVAE or the tokenizer it was trained with): what replacing those would leave without its inputs."""
    if prior is None or fingerprint is None:
        return None
    try:
        ck = load(prior, "prior")
    except UserError:  # no prior there (or none readable): nothing to protect
        return None
    return ck if ck.meta.get(key) == fingerprint else None
