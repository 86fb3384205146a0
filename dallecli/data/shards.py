"""Writing image shards: deterministic WebDataset tars, the train/val split, manifest.json, rejects.jsonl,
and an exact resume after any interruption (DESIGN.md, "The data flow": build-shards ─► DIR/shards/).

Determinism: inputs are listed in a fixed order and prepared by an *ordered* pool map, so the n-th
accepted sample of a split is the same whatever --workers is, and shard k always holds the same samples.
Tar headers carry no time or owner (mtime 0, uid/gid 0, members sorted), so the bytes are reproducible.

Resume: the shard being filled for each split is appended to `SPLIT-NNNNNN.tar.partial`. When a shard
fills, it is closed, its sha256 is recorded in `.build-state.json` together with everything needed to
continue (inputs consumed, the other split's partial-shard length, rejects.jsonl length, counts), and
only then is it renamed to `SPLIT-NNNNNN.tar`. A rerun of the same command truncates the partial files
and rejects.jsonl back to the recorded lengths and continues with the next input, so the final shards
are byte-identical to an uninterrupted run. manifest.json is written last; its presence means "done".

Staging: all of this happens in OUT/.unfinished/, never among the shards that OUT may already hold, so a
build that fails or is killed leaves those exactly as they were (and no reader mistakes half a build for
shards: readers list OUT's own files only). Once the staged manifest.json exists, `_install` moves the
new files into OUT, the old manifest.json out first and the new one in last; a crash part-way is
finished by the next run (`_open_folder`), as checkpoint.recover finishes an interrupted re-save.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from dallecli.config import read_json, to_dict, write_json_atomic
from dallecli.console import UserError, progress
from dallecli.data.listing import open_source
from dallecli.data.records import SHARD_RE, install_staged, shard_name
from dallecli.data.sources import Item, Prepared, PrepareConfig, SourceSpec
from dallecli.data.workers import prepared_in_order, worker_pool

SPLITS = ("train", "val")
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
STATE = ".build-state.json"
DEDUP = ".build-dedup"          # "sha256 key" per accepted image, while --dedup builds are in progress
PARTIAL = ".partial"
STAGE = ".unfinished"           # the build in progress, inside OUT; moved into OUT once complete
MIN_INPUTS_FOR_RATE = 20        # --max-error-rate is judged mid-build only after this many inputs (see below)
MAX_INPUTS_FOR_RATE = 1000      # ... and at the latest after this many (or a quarter of the inputs, if fewer)
_RECORD = tarfile.RECORDSIZE
# A file name that is not UTF-8 (os.walk gives it as lone surrogates) is written as a \udcXX JSON escape.
_UNDECODABLE = "backslashreplace"


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides the bytes of the shards (so: not --workers). Recorded in manifest.json;
    a rerun with a different BuildConfig over the same folder is refused unless --overwrite."""

    source: SourceSpec
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    val_fraction: float = 0.05       # held-out share, chosen per sample by a hash of its key
    per_shard: int = 1000            # samples per tar: ~30–100 MB of 256² JPEGs, easy to shuffle over
    dedup: bool = False              # drop exact duplicate images (same bytes); off: COCO repeats images
    max_error_rate: float = 0.5      # stop when more inputs than this fail (unreadable, not when filtered)

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.per_shard < 1:
            raise UserError(f"--per-shard must be at least 1, got {self.per_shard}")


def split_of(key: str, val_fraction: float) -> str:
    """A stable split from the key alone: the same sample lands in the same split in every build."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "val" if h < val_fraction * 2.0 ** 64 else "train"


# ---- deterministic tar writing -------------------------------------------------------------------

def tar_member(name: str, data: bytes) -> bytes:
    """One tar member with reproducible headers: mtime 0, uid/gid 0, no owner names, mode 0644."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + data + b"\0" * (-len(data) % 512)


def tar_end(offset: int) -> bytes:
    """End-of-archive: two zero blocks, then padding to a whole record, as tarfile writes it."""
    end = offset + 2 * tarfile.BLOCKSIZE
    return b"\0" * (2 * tarfile.BLOCKSIZE + (-end % _RECORD))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """The shard being filled for one split, appended sample by sample to `SPLIT-NNNNNN.tar.partial`."""

    def __init__(self, folder: Path, split: str, index: int = 0, count: int = 0, offset: int = 0):
        self.folder, self.split, self.index, self.count, self.offset = folder, split, index, count, offset
        self._file = None
        partial = self.partial_path
        if offset or partial.exists():
            if not partial.is_file() or partial.stat().st_size < offset:
                raise UserError(f"cannot resume: {partial} is missing or shorter than recorded; "
                                "rerun with --overwrite to start again")
            self._file = open(partial, "r+b")
            self._file.truncate(offset)
            self._file.seek(offset)

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)

    @property
    def partial_path(self) -> Path:
        return self.folder / (self.name + PARTIAL)

    def add(self, key: str, members: dict[str, bytes]) -> None:
        if self._file is None:
            self._file = open(self.partial_path, "wb")
        blob = b"".join(tar_member(f"{key}.{ext}", members[ext]) for ext in sorted(members))
        self._file.write(blob)
        self.offset += len(blob)
        self.count += 1

    def sync(self) -> dict[str, int]:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        return {"index": self.index, "count": self.count, "offset": self.offset}

    def finish(self) -> tuple[dict[str, Any], Path]:
        """Close the shard; return its manifest entry and the partial file (renamed by the caller once
        the state records it). The writer moves on to the next index."""
        assert self._file is not None and self.count > 0
        self._file.write(tar_end(self.offset))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        partial = self.partial_path
        entry = {"name": self.name, "split": self.split, "samples": self.count,
                 "bytes": partial.stat().st_size, "sha256": file_sha256(partial)}
        self.index, self.count, self.offset = self.index + 1, 0, 0
        return entry, partial

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# ---- the output folder ---------------------------------------------------------------------------

def _is_ours(name: str) -> bool:
    base = name[: -len(PARTIAL)] if name.endswith(PARTIAL) else name
    return (SHARD_RE.match(base) is not None or name in (MANIFEST, REJECTS, STATE, DEDUP)
            or (name.startswith((f".{MANIFEST}.", f".{STATE}.")) and name.endswith(".tmp")))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
    return out


# Settings that decide when to give up or how long to wait, not what the shards hold: changing them
# does not make a folder "built with different arguments" (e.g. resume a stopped run with a higher
# --max-error-rate after reading rejects.jsonl).
_POLICY = frozenset({"max_error_rate", "backoff"})


def _comparable(args: Any) -> dict[str, Any]:
    return {k: v for k, v in _flatten(args or {}).items() if k.rsplit(".", 1)[-1] not in _POLICY}


def _differences(old: Any, new: dict[str, Any]) -> str:
    a, b = _comparable(old), _comparable(new)
    diffs = [f"{k.split('.')[-1]}: {a.get(k)!r} → {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(diffs[:4])


def _refuse_different(out: Path, old: Any, new: dict[str, Any]) -> UserError:
    return UserError(f"{out} was built with different arguments ({_differences(old, new)}); pass --overwrite "
                     "to replace it, or --out DIR to write elsewhere")


def _install(out: Path) -> None:
    """Move the complete build in OUT/STAGE into OUT (`records.install_staged`: the staged manifest.json is the
    commit point; until it has moved, a rerun calls this again and carries on where it stopped)."""
    manifest = read_json(out / STAGE / MANIFEST, "shard manifest")
    install_staged(out, out / STAGE, {e["name"] for e in manifest["shards"]} | {REJECTS}, _is_ours)


def _inputs_changed(recorded: Any, inputs: dict[str, Any] | None) -> str | None:
    """How the inputs differ from those a build `recorded` (None: the same, or either side unknown)."""
    if not isinstance(recorded, dict) or inputs is None or recorded.get("digest") == inputs.get("digest"):
        return None
    before, now = recorded.get("files"), inputs.get("files")
    unit = inputs.get("unit", "files")
    return f"{before} → {now} {unit}" if before != now else f"{now} {unit}, some with other sizes or modification times"


def _resumable(stage: Path, args: dict[str, Any], inputs: dict[str, Any] | None) -> bool:
    """Whether `stage` holds an unfinished build of these arguments over these inputs."""
    if not (stage / STATE).exists():
        return False
    state = read_json(stage / STATE, "build state")
    return (_comparable(state.get("arguments")) == _comparable(args)
            and _inputs_changed(state.get("inputs"), inputs) is None)


def _open_folder(out: Path, args: dict[str, Any], overwrite: bool,
                 inputs: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Decide what to do with the output folder. Returns the finished manifest when the same build is
    already complete in OUT, None when there is work to do in OUT/STAGE (fresh or resumed). A build, complete
    or not, over inputs that changed since (`inputs`, the source's signature) is refused: the shards would no
    longer be theirs, and a resumed build counts its position in the list of inputs."""
    out.mkdir(parents=True, exist_ok=True)
    stage = out / STAGE
    if (stage / MANIFEST).exists():             # a crash cut an install short: finish it
        _install(out)
    complete = read_json(out / MANIFEST, "shard manifest") if (out / MANIFEST).exists() else None
    if overwrite:                               # start again in the stage; OUT stays as it is until the end
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        return None
    if complete is not None and _comparable(complete.get("arguments")) == _comparable(args):
        missing = [s["name"] for s in complete["shards"] if not (out / s["name"]).is_file()]
        if missing:
            raise UserError(f"{out} is complete but {missing[0]} is missing; rebuild with --overwrite")
        changed = _inputs_changed(complete.get("inputs"), inputs)
        if changed and _resumable(stage, args, inputs):
            return None  # an interrupted --overwrite over the changed inputs: finish it
        if changed:
            raise UserError(f"the inputs changed since the shards in {out} were built ({changed}); pass "
                            "--overwrite to build them again from the inputs as they are now")
        for stale in (STATE, DEDUP):
            (out / stale).unlink(missing_ok=True)
        return complete
    if (stage / STATE).exists():                # an unfinished build (a first one, or an --overwrite): resume it
        state = read_json(stage / STATE, "build state")
        if _comparable(state.get("arguments")) != _comparable(args):
            raise UserError(f"{stage} holds an unfinished build with different arguments "
                            f"({_differences(state.get('arguments'), args)}); rerun that command to finish it, "
                            "or pass --overwrite to start this one instead")
        changed = _inputs_changed(state.get("inputs"), inputs)
        if changed:
            raise UserError(f"the inputs changed since the unfinished build in {stage} began ({changed}), so it "
                            "cannot resume where it stopped; pass --overwrite to start it again")
        return None
    if complete is not None:
        raise _refuse_different(out, complete.get("arguments"), args)
    ours = sorted(p.name for p in out.iterdir() if _is_ours(p.name))
    if ours:
        raise UserError(f"{out} already holds {ours[0]} from another build; pass --overwrite to replace "
                        "it, or --out DIR to write elsewhere")
    shutil.rmtree(stage, ignore_errors=True)    # what a failed build left: its rejects.jsonl at most
    stage.mkdir()
    return None


# ---- the build -----------------------------------------------------------------------------------

@dataclass
class Stats:
    inputs: int = 0
    errors: int = 0
    kept: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    rejects: dict[str, int] = field(default_factory=dict)
    # Kept images whose shorter side was below --size, so were upscaled (blurry training data), and how many
    # had each shorter side: at most --size entries, enough for the median the command names. A state file
    # from before these fields lacks them; resuming then counts only the rest of the build.
    upscaled: int = 0
    upscaled_sides: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.upscaled_sides = {int(side): n for side, n in self.upscaled_sides.items()}  # JSON keys are strings

    def upscaled_median(self) -> int | None:
        """The (lower) median shorter side of the upscaled images."""
        seen, middle = 0, (self.upscaled - 1) // 2
        for side in sorted(self.upscaled_sides):
            seen += self.upscaled_sides[side]
            if seen > middle:
                return side
        return None

    def summary_line(self, n: int = 3) -> str:
        top = Counter(self.rejects).most_common(n)
        more = len(self.rejects) - len(top)
        return ", ".join(f"{reason} ×{count}" for reason, count in top) + (f", +{more} more kinds" if more else "")


class _Build:
    """The mutable side of one build: writers, logs, counts, checkpoints."""

    def __init__(self, final: Path, config: BuildConfig, args: dict[str, Any],
                 inputs: dict[str, Any] | None = None):
        self.final, self.out = final, final / STAGE     # OUT, and the stage this build writes in
        self.config, self.args, self.inputs = config, args, inputs
        out = self.out
        state = read_json(out / STATE, "build state") if (out / STATE).exists() else None
        state = state or {"next_input": 0, "writers": {}, "shards": [], "rejects_offset": 0,
                          "dedup_offset": 0, "stats": {}}
        self.next_input: int = state["next_input"]
        self.shards: list[dict[str, Any]] = state["shards"]
        self.stats = Stats(**state["stats"])
        for entry in self.shards:          # finish a rename that an interruption cut short
            final, partial = out / entry["name"], out / (entry["name"] + PARTIAL)
            if not final.is_file():
                if not (partial.is_file() and file_sha256(partial) == entry["sha256"]):
                    raise UserError(f"cannot resume: shard {final} is missing; rerun with --overwrite")
                os.replace(partial, final)
        self.writers = {s: ShardWriter(out, s, **state["writers"].get(s, {})) for s in SPLITS}
        self.rejects = self._reopen(out / REJECTS, state["rejects_offset"])
        self.dedup_file = self._reopen(out / DEDUP, state["dedup_offset"]) if config.dedup else None
        self.seen: dict[str, str] = {}
        if self.dedup_file is not None:
            self.dedup_file.seek(0)
            for line in self.dedup_file.read().decode().splitlines():
                digest, _, key = line.partition(" ")
                self.seen[digest] = key
        self.checkpoint(self.next_input)

    @staticmethod
    def _reopen(path: Path, offset: int):
        f = open(path, "r+b" if path.exists() else "w+b")
        f.truncate(offset)
        f.seek(offset)
        return f

    def checkpoint(self, next_input: int) -> None:
        """Make everything up to `next_input` durable, then record it (the state file is the commit)."""
        self.next_input = next_input
        writers = {s: w.sync() for s, w in self.writers.items()}
        for f in (self.rejects, self.dedup_file):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
        write_json_atomic(self.out / STATE, {
            "arguments": self.args, "inputs": self.inputs, "next_input": next_input, "writers": writers,
            "shards": self.shards,
            "rejects_offset": self.rejects.tell(),
            "dedup_offset": self.dedup_file.tell() if self.dedup_file is not None else 0,
            "stats": dataclasses.asdict(self.stats)})

    def reject(self, key: str, source: str, reason: str, detail: str, is_error: bool) -> None:
        self.stats.rejects[reason] = self.stats.rejects.get(reason, 0) + 1
        self.stats.errors += is_error
        line = {"key": key, "source": source, "reason": reason, "detail": detail}
        self.rejects.write((json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8", _UNDECODABLE))

    def consume(self, index: int, p: Prepared) -> None:
        """Account for input number `index` (0-based, in listing order)."""
        self.stats.inputs += 1
        if p.reject is not None:
            self.reject(p.key, p.source, p.reject.reason, p.reject.detail, p.reject.is_error)
            return
        if self.dedup_file is not None and p.content_hash is not None:
            if p.content_hash in self.seen:
                self.reject(p.key, p.source, "duplicate-image", f"same image as {self.seen[p.content_hash]}", False)
                return
            self.seen[p.content_hash] = p.key
            self.dedup_file.write(f"{p.content_hash} {p.key}\n".encode())
        split = p.split or split_of(p.key, self.config.val_fraction)
        meta = {**p.meta, "key": p.key, "source": p.source, "split": split,
                "width": p.image.width, "height": p.image.height}
        writer = self.writers[split]
        writer.add(p.key, {p.image.ext: p.image.data, "txt": p.caption.encode("utf-8"),
                           "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8", _UNDECODABLE)})
        self.stats.kept[split] += 1
        side = min(p.image.width, p.image.height)
        if side < self.config.prepare.image.size:
            self.stats.upscaled += 1
            self.stats.upscaled_sides[side] = self.stats.upscaled_sides.get(side, 0) + 1
        if writer.count >= self.config.per_shard:
            self._finish_shard(writer, index + 1)

    def _finish_shard(self, writer: ShardWriter, next_input: int) -> None:
        entry, partial = writer.finish()
        self.shards.append(entry)
        self.checkpoint(next_input)
        os.replace(partial, self.out / entry["name"])

    def _untouched(self) -> str:
        return f"; the shards in {self.final} are untouched" if (self.final / MANIFEST).exists() else ""

    def check_error_rate(self, final: bool, total: int | None = None) -> None:
        """Stop when more than --max-error-rate of the inputs are broken. Mid-build (`final` False) the rate so
        far decides once it is a fair sample: after a quarter of the `total` inputs (at least 20, at most 1,000;
        20 where the total is unknown), so that broken files sorting together at the start (a folder's
        uncaptioned `a_*.png`) do not stop a build that is mostly good; or at once where the errors alone
        already exceed the limit of the total, when the end could not pass either."""
        s, limit = self.stats, self.config.max_error_rate
        if not s.inputs or s.errors / s.inputs <= limit:
            return
        judge_after = MIN_INPUTS_FOR_RATE if total is None else \
            max(MIN_INPUTS_FOR_RATE, min(MAX_INPUTS_FOR_RATE, total // 4))
        certain = total is not None and s.errors > limit * total
        if final or certain or s.inputs >= judge_after:
            read = f"{s.inputs}" if final or s.inputs == total else f"the first {s.inputs}"
            raise UserError(f"{s.errors} of {read} inputs failed ({s.errors / s.inputs:.0%} > "
                            f"--max-error-rate {limit:g}): {s.summary_line()}; see {self.out / REJECTS}, then "
                            f"fix the inputs or rerun with a higher --max-error-rate to go on{self._untouched()}")

    def finish(self) -> dict[str, Any]:
        for writer in self.writers.values():
            if writer.count:
                self._finish_shard(writer, self.next_input)
        if not any(self.stats.kept.values()):
            self.close()        # nothing to resume: keep only rejects.jsonl, for the message to point to
            for name in (STATE, DEDUP):
                (self.out / name).unlink(missing_ok=True)
            raise UserError(f"no sample passed the filters ({self.stats.summary_line()}); see "
                            f"{self.out / REJECTS}{self._untouched()}")
        shards = sorted(self.shards, key=lambda e: (SPLITS.index(e["split"]), e["name"]))
        manifest = {
            "format": "dalle-shards/1", "created_by": "dalle build-shards",
            "arguments": self.args,
            "inputs": self.inputs,
            "counts": {"inputs": self.stats.inputs, **self.stats.kept,
                       "rejected": sum(self.stats.rejects.values()), "errors": self.stats.errors,
                       "upscaled": self.stats.upscaled},
            "rejects": dict(sorted(self.stats.rejects.items())),
            "shards": shards,
        }
        write_json_atomic(self.out / MANIFEST, manifest)
        self.close()
        (self.out / STATE).unlink(missing_ok=True)
        (self.out / DEDUP).unlink(missing_ok=True)
        _install(self.final)
        return manifest

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        for f in (self.rejects, self.dedup_file):
            if f is not None and not f.closed:
                f.close()


def _peek(items: Iterator[Item]) -> Iterator[Item]:
    """Start the stream now, so that a source failing at once (a missing emoji font) fails before any
    file is written."""
    first = next(items, None)
    return items if first is None else itertools.chain([first], items)


def build(config: BuildConfig, out: Path, *, workers: int = 1, overwrite: bool = False) -> dict[str, Any]:
    """Build (or finish, or confirm) the shards of `config` in `out`; return the manifest, with
    `already_complete` when it was only confirmed, else `upscaled_median_side` (None when none was)."""
    out = Path(out)
    if config.source.kind in ("folder", "webdataset"):
        src = Path(config.source.path).resolve()
        if out.resolve() in (src, src.parent if src.is_file() else src):
            raise UserError(f"the output folder {out} is the input; pass --out DIR to write elsewhere")
    skip = []  # the folder being written, when it lies inside the input (other dalle folders are recognised)
    if config.source.kind == "folder" and out.resolve().is_relative_to(Path(config.source.path).resolve()):
        skip = [out.resolve()]
    source = open_source(config.source, config.prepare.image.size, config.val_fraction, skip)
    items = _peek(source.items)
    args = to_dict(config)
    done = _open_folder(out, args, overwrite, source.inputs)
    if done is not None:
        return {**done, "already_complete": True}
    run = _Build(out, config, args, source.inputs)
    start = run.next_input
    try:
        batch = 16 if config.source.kind == "manifest" else 8   # manifests may hold URLs: download more at once
        with worker_pool(workers, config.prepare) as pool, \
                contextlib.closing(prepared_in_order(itertools.islice(items, start, None), config.prepare,
                                                     pool, batch, 3 * workers)) as results, \
                progress(f"build-shards ({source.kind})", source.total, unit="img", start=start) as bar:
            for index, prepared in enumerate(results, start):
                run.consume(index, prepared)
                run.next_input = index + 1
                bar.advance(1, kept=sum(run.stats.kept.values()), rejected=sum(run.stats.rejects.values()))
                run.check_error_rate(final=False, total=source.total)
        run.checkpoint(run.next_input)
        run.check_error_rate(final=True)
        return {**run.finish(), "upscaled_median_side": run.stats.upscaled_median()}
    finally:
        run.close()
