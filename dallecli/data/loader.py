"""Training data: random access into tar shards, an exactly resumable order, per-sample seeded augmentation.

Each shard is indexed once (member names and byte offsets, read from the tar headers only), so any
sample can be read by index. The order of an epoch is a seeded permutation of all indices; a run's
data position is simply the number of global batches consumed. Resuming at batch b starts the
permutation of epoch b // batches_per_epoch at the right place, whatever the number of workers or
processes: nothing is skipped or seen twice (DESIGN.md, "Checkpoints": exact resume).

Random augmentation draws from a generator seeded by (seed, epoch, index), never from a worker's
global state, so the same sample gets the same crop in every run.

A bad sample (corrupt image, bad caption, any exception its decoder raises) yields `None` with its
reason; the collate function drops it and reports (shard, key, reason) to the caller, who stops after
too many failures in a row. What indexing leaves out (a damaged tar tail, a duplicate key) is listed
in `loader.index_errors`. Nothing here ever unpickles a member: members are bytes until a decode
function reads the ones it knows (.png/.jpg/.txt/.json/.codes).
"""
from __future__ import annotations

import hashlib
import io
import json
import signal
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dallecli.console import UserError
from dallecli.data.records import IMAGE_EXTS, list_shards, split_member_name, tail_problem


@dataclass(frozen=True)
class Entry:
    shard: int  # index into the shard list
    key: str
    members: tuple[tuple[str, int, int], ...]  # (ext, byte offset, size)


def index_shard(path: Path, shard_id: int, errors: list[dict] | None = None) -> list[Entry]:
    """Scan one tar's headers (no data is read) and group members by key, in file order.

    Damage is reported in `errors` as {"shard", "key", "reason"} (or raised as a UserError when
    `errors` is None): a corrupt or cut-off tail, and every record whose bytes are not all there.
    The complete records before the damage are kept. A key repeated right after itself (the same
    member twice) starts a new record, so that the duplicate is seen and dropped by `ShardIndex`."""
    entries: list[Entry] = []
    current_key, members = None, []
    end = None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_member_name(info.name)
                if current_key is not None and (key != current_key or any(e == ext for e, _, _ in members)):
                    entries.append(Entry(shard_id, current_key, tuple(members)))
                    members = []
                current_key = key
                members.append((ext, info.offset_data, info.size))
            end = tar.offset
    except (tarfile.TarError, EOFError, OSError) as exc:
        if errors is None:
            raise UserError(f"shard {path} is corrupt or truncated ({exc}); rebuild it with `dalle build-shards`")
        errors.append({"shard": path.name, "key": current_key, "reason": f"truncated or corrupt tar: {exc}"})
        current_key = None  # the record being read when the tar broke may be incomplete: drop it
    if current_key is not None:
        entries.append(Entry(shard_id, current_key, tuple(members)))
    # A truncated final member reads past the end: drop records whose bytes are not all there.
    size = path.stat().st_size
    kept = []
    for entry in entries:
        if all(off + n <= size for _, off, n in entry.members):
            kept.append(entry)
        elif errors is not None:
            errors.append({"shard": path.name, "key": entry.key, "reason": "member cut off by a truncated tar"})
        else:
            raise UserError(f"shard {path} is truncated (sample {entry.key} is cut off); "
                            "rebuild it with `dalle build-shards`")
    problem = tail_problem(path, end) if end is not None else None
    if problem:
        if errors is None:
            raise UserError(f"shard {path} is corrupt or truncated ({problem}); rebuild it with `dalle build-shards`")
        errors.append({"shard": path.name, "key": kept[-1].key if kept else None, "reason": problem})
    return kept


def _holds_codes(folder: Path) -> bool:
    """Whether `folder` is (or was) a code-shard folder, by its manifest's kind: the missing shards are
    `dalle encode`'s to make."""
    try:
        return json.loads((folder / "manifest.json").read_text()).get("kind") == "codes"
    except (OSError, ValueError, AttributeError):
        return False


class ShardIndex:
    """All samples of one split, readable by index.

    Problems found while indexing (a damaged tar, a duplicate key) never stop training: the samples
    concerned are left out and listed in `self.errors` as {"shard", "key", "reason"} (and appended to
    `errors` when given), for the training loop to report."""

    def __init__(self, folder: Path, split: str, errors: list[dict] | None = None):
        self.paths = list_shards(folder, split)
        if not self.paths:
            codes = _holds_codes(Path(folder))
            if split == "val" and list_shards(folder, "train"):  # a small set: --val-fraction held none out
                then = ", then encode them again (`dalle encode`)" if codes else ""
                raise UserError(f"no val shards in {folder}: every sample went to train; rebuild the image shards "
                                f"with a larger --val-fraction (`dalle build-shards --val-fraction 0.1 --overwrite`)"
                                f"{then}")
            raise UserError(f"no {split} shards in {folder}; make them with "
                            f"`{'dalle encode' if codes else 'dalle build-shards'}`")
        self.entries: list[Entry] = []
        self.errors: list[dict] = []
        seen: dict[str, str] = {}
        for i, path in enumerate(self.paths):
            for entry in index_shard(path, i, self.errors):
                if entry.key in seen:  # a duplicate key would be trained on twice: keep the first
                    self.errors.append({"shard": path.name, "key": entry.key, "reason":
                                        f"duplicate key (first seen in {seen[entry.key]}); kept the first"})
                    continue
                seen[entry.key] = path.name
                self.entries.append(entry)
        if errors is not None:
            errors.extend(self.errors)
        if not self.entries:
            raise UserError(f"the {split} shards in {folder} hold no samples; rebuild them with `dalle build-shards`")

    def __len__(self) -> int:
        return len(self.entries)

    def read(self, i: int) -> tuple[Entry, dict[str, bytes]]:
        entry = self.entries[i]
        out = {}
        with open(self.paths[entry.shard], "rb") as f:
            for ext, off, n in entry.members:
                f.seek(off)
                out[ext] = f.read(n)
        return entry, out


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation, stable across runs, workers and machines."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class ResumableSampler(Sampler):
    """Yields (epoch, index) for this rank, starting at global batch `start_batch`.

    Epoch e's order is a permutation seeded by (seed, e). A global batch holds `batch_size * world`
    consecutive indices of that order; rank r takes its slice. Incomplete final batches are dropped.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0, world: int = 1,
                 shuffle: bool = True):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_batch, self.rank, self.world, self.shuffle = start_batch, rank, world, shuffle
        self.global_batch = batch_size * world
        self.batches_per_epoch = n // self.global_batch
        if self.batches_per_epoch < 1:
            needed = f"--batch-size {batch_size}" + (f" × {world} processes = {self.global_batch}" if world > 1 else "")
            raise UserError(f"the split has {n} samples, fewer than one batch ({needed}); lower --batch-size or "
                            "add data")

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        b = self.start_batch
        while True:
            epoch, within = divmod(b, self.batches_per_epoch)
            order = self.order(epoch)
            for j in range(within, self.batches_per_epoch):
                lo = j * self.global_batch + self.rank * self.batch_size
                for i in order[lo: lo + self.batch_size].tolist():
                    yield epoch, i
            b = (epoch + 1) * self.batches_per_epoch

    def __len__(self) -> int:  # an endless stream; DataLoader only needs this for its own bookkeeping
        return 2**62


class RecordDataset(Dataset):
    """Maps (epoch, index) to `decode(members, rng) -> sample`, or to None with a reason."""

    def __init__(self, index: ShardIndex, decode: Callable[[dict[str, bytes], np.random.Generator], Any], seed: int):
        self.index, self.decode, self.seed = index, decode, seed

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: tuple[int, int]):
        epoch, i = item
        entry = self.index.entries[i]
        shard = self.index.paths[entry.shard].name
        rng = np.random.default_rng(sample_seed(self.seed, epoch, i))
        try:
            _, members = self.index.read(i)
            return entry.key, self.decode(members, rng), None
        except BadSample as exc:
            return entry.key, None, {"shard": shard, "key": entry.key, "reason": str(exc)}
        except Exception as exc:  # untrusted bytes can make any decoder raise anything: skip, report, go on
            return entry.key, None, {"shard": shard, "key": entry.key,
                                     "reason": f"{type(exc).__name__}: {_first_line(exc)}"}


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else ""


class BadSample(ValueError):
    """Raised by a decode function for a sample that cannot be used; the reason is reported."""


@dataclass
class Batch:
    keys: list[str]
    data: Any  # the collated tensors
    errors: list[dict]
    ok: list[bool] | None = None  # per sample, in the sampler's order: decoded (True) or reported (False)


def make_collate(collate: Callable[[list], Any]) -> Callable[[list], Batch]:
    def _collate(items):
        good = [(k, s) for k, s, e in items if s is not None]
        errors = [e for _, s, e in items if s is None]
        data = collate([s for _, s in good]) if good else None
        return Batch(keys=[k for k, _ in good], data=data, errors=errors,
                     ok=[s is not None for _, s, _ in items])

    return _collate


def _worker_init(worker_id: int) -> None:
    # A terminal's Ctrl-C, and a scheduler's SIGTERM to the job, reach every process of the group. The main
    # process decides what they mean (finish the step, save, exit 128 + the signal) and then shuts the workers
    # down; a worker that died from the signal first would take the batches the step still needs with it.
    # Worse, one killed while holding the lock of the DataLoader's shared `done_event` (workers take it for
    # every batch) leaves the main process blocked for ever on that lock. The DataLoader's own SIGTERM at
    # shutdown goes only to a worker still busy after its join timeout; ignored, such a worker ends with its
    # item, or with the main process (SIGKILL when its parent dies, even in the middle of a decode).
    from dallecli.data.workers import die_with_parent

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent()


def make_loader(index: ShardIndex, decode, collate, *, batch_size: int, seed: int, start_batch: int = 0,
                rank: int = 0, world: int = 1, workers: int = 0, shuffle: bool = True) -> DataLoader:
    """An endless loader of `Batch`es starting at global batch `start_batch`.

    `loader.index_errors` lists what indexing left out (damaged tars, duplicate keys)."""
    sampler = ResumableSampler(len(index), batch_size, seed, start_batch, rank, world, shuffle)
    loader = DataLoader(RecordDataset(index, decode, seed), batch_size=batch_size, sampler=sampler,
                        num_workers=workers, collate_fn=make_collate(collate),
                        persistent_workers=False, prefetch_factor=4 if workers else None,
                        worker_init_fn=_worker_init if workers else None,
                        # Its own generator: creating the iterator must not draw from the global RNG,
                        # or a resumed run's dropout and gumbel noise would shift by one draw.
                        generator=torch.Generator().manual_seed(seed))
    loader.index_errors = list(index.errors)
    return loader


# --- decoding helpers shared by the stages -------------------------------------------------------------

def read_caption(members: dict[str, bytes]) -> str:
    if "txt" not in members:
        raise BadSample("missing caption (.txt)")
    try:
        caption = members["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadSample("caption is not UTF-8") from None
    if not caption:
        raise BadSample("empty caption")
    return caption


MAX_ASPECT = 4.0  # a longer side over 4× the shorter one: a crop would keep too little of the picture


def read_image(members: dict[str, bytes], size: int | None = None):
    """Decode the image member as 8-bit RGB (PIL).

    The same conversion as `dalle build-shards` makes (`images.upright_rgb8`), so that shards made elsewhere
    read as ours would have been made: every mode is converted, not refused (CMYK, palette, greyscale, 1-bit,
    16-bit scaled from 0..65535, not clipped; transparency composited on white), and an EXIF orientation is
    applied. With `size`, an image whose shorter side is below `size`, or whose aspect ratio exceeds
    MAX_ASPECT, is a BadSample."""
    from PIL import Image

    from dallecli.data.images import upright_rgb8

    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None:
        raise BadSample("no image member (.png/.jpg/.webp)")
    if not members[ext]:
        raise BadSample(f"empty image file (.{ext}, 0 bytes)")
    try:
        with Image.open(io.BytesIO(members[ext])) as im:
            image = upright_rgb8(im)  # as build-shards makes them: shards of other tools are read too
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError… on bad bytes
        raise BadSample(f"unreadable image ({type(exc).__name__}: {_first_line(exc)})") from None
    if size is not None:
        w, h = image.size
        if max(w, h) > MAX_ASPECT * min(w, h):
            raise BadSample(f"image {w}x{h} has an aspect ratio over {MAX_ASPECT:g}:1")
        if min(w, h) < size:
            raise BadSample(f"image {w}x{h} is smaller than {size} px")
    return image


def read_codes(members: dict[str, bytes], grid: int) -> torch.Tensor:
    """The uint16 codes of a code shard member, as a (grid, grid) int64 tensor."""
    raw = members.get("codes")
    if raw is None:
        raise BadSample("no codes member (.codes)")
    if len(raw) != 2 * grid * grid:
        raise BadSample(f"codes hold {len(raw) // 2} values, expected {grid}x{grid}")
    return torch.from_numpy(np.frombuffer(raw, dtype="<u2").astype(np.int64)).view(grid, grid)


def read_meta(members: dict[str, bytes]) -> dict:
    raw = members.get("json")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadSample("metadata (.json) is not valid JSON") from None
    return meta if isinstance(meta, dict) else {}
