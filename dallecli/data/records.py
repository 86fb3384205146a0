"""Reading shards as raw records: tar members grouped by key, no decoding, no pickle.

A shard is a WebDataset tar: for each sample, members `KEY.png` or `KEY.jpg` (image shards) or
`KEY.codes` (code shards: uint16 little-endian, row-major), `KEY.txt` (caption, UTF-8) and
`KEY.json` (metadata). Readers here only group bytes; decoding is the caller's choice, so nothing
can ever be unpickled from a shard (members such as `.pyd` / `.pth` / `.pickle` are never decoded).
"""
from __future__ import annotations

import io
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from dallecli.console import UserError

SHARD_RE = re.compile(r"^(?P<split>[a-z][a-z0-9_-]*)-(?P<index>\d{6})\.tar$")
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


@dataclass
class Record:
    key: str
    shard: str
    members: dict[str, bytes] = field(default_factory=dict)

    @property
    def image_ext(self) -> str | None:
        return next((e for e in IMAGE_EXTS if e in self.members), None)


@dataclass
class ShardError:
    """A problem found while reading a shard (truncated tail, unreadable member)."""

    shard: str
    key: str | None
    reason: str


class ShardWriteError(UserError, OSError):
    """Writing a shard failed (disk full, unwritable folder): one clear line; still an OSError."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def list_shards(folder: Path, split: str) -> list[Path]:
    """The shards of one split in a folder, in index order. A missing folder is a UserError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"no shard folder at {folder}; make one with `dalle build-shards`")
    found = []
    for path in folder.iterdir():
        m = SHARD_RE.match(path.name)
        if m and m.group("split") == split:
            found.append((int(m.group("index")), path))
    return [p for _, p in sorted(found)]


def split_member_name(name: str) -> tuple[str, str]:
    """`dir/abc.def.png` -> (`dir/abc`, `def.png`): the key ends at the first dot of the base name,
    as WebDataset does."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{head}/{stem}" if head else stem
    return key, ext.lower() if dot else ""


def tail_problem(path: Path, end: int) -> str | None:
    """What is wrong after the last member a tar reader could parse, if anything.

    `end` is where the reader stopped (the offset of the next header). A sound tar has only zero
    blocks (the end-of-archive marker and padding) from there on. Nothing at all means the file was
    cut at a member boundary; non-zero bytes mean a corrupt header or a cut inside one. A cut inside
    a member's data (end past the file size) is reported per member by the callers."""
    size = Path(path).stat().st_size
    if end > size:
        return None
    if end == size:
        return "the tar has no end-of-archive marker: it was cut short (truncated copy or interrupted write)"
    with open(path, "rb") as f:
        f.seek(end)
        while block := f.read(1 << 20):
            if block.count(0) != len(block):
                return (f"{size - end} bytes after offset {end} are not a readable tar member "
                        "(a corrupt header or a truncated tail); the samples there are lost")
    return None


def _is_plain_tar(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(6)
    return not head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ"))  # gzip, bzip2, xz


def iter_records(path: Path, errors: list[ShardError] | None = None) -> Iterator[Record]:
    """Yield the records of one tar shard in order. A truncated or corrupt tail ends the shard;
    it is appended to `errors` (if given) instead of raising. Every complete record before the damage
    is still yielded; the record being read when the tar broke is dropped (never half a sample)."""
    path = Path(path)
    current: Record | None = None
    plain = _is_plain_tar(path)
    try:
        with tarfile.open(path, mode="r:" if plain else "r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_member_name(info.name)
                if current is not None and (key != current.key or ext in current.members):
                    yield current  # complete: the next member starts another record
                    current = None
                if current is None:
                    current = Record(key=key, shard=path.name)
                f = tar.extractfile(info)
                data = f.read() if f is not None else b""
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name} is cut off ({len(data)} of {info.size} bytes)")
                current.members[ext] = data
            end = tar.offset
    except (tarfile.TarError, EOFError, OSError) as exc:
        if errors is None:
            raise UserError(f"shard {path} is corrupt or truncated ({exc}); rebuild it with `dalle build-shards`")
        errors.append(ShardError(shard=path.name, key=current.key if current else None,
                                 reason=f"corrupt or truncated tar: {exc}"))
        return
    if current is not None:
        yield current
    problem = tail_problem(path, end) if plain else None
    if problem:
        if errors is None:
            raise UserError(f"shard {path} is corrupt or truncated ({problem}); rebuild it with `dalle build-shards`")
        errors.append(ShardError(shard=path.name, key=None, reason=problem))


def write_tar(path: Path, records: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write records to a tar atomically, with deterministic headers (mtime 0, uid 0, mode 0644), so the
    same records always give the same bytes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, members in records:
                    for ext in sorted(members):
                        data = members[ext]
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size, info.mtime, info.mode = len(data), 0, 0o644
                        info.uid = info.gid = 0
                        info.uname = info.gname = ""
                        tar.addfile(info, io.BytesIO(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ShardWriteError(f"cannot write shard {path}: {exc.strerror or exc} (disk full or not writable?); "
                              "the shards already written are intact: free space and rerun the same command"
                              ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def install_staged(out: Path, stage: Path, names: set[str], replaces, folders: tuple[str, ...] = ()) -> None:
    """Move a complete set of shards written in `stage` into `out`, replacing the set there (a build of
    `dalle build-shards`, the codes of `dalle encode`). `out/manifest.json` goes first and the staged one moves
    in last, so `out` holds a complete set exactly when its manifest is there; a crash part-way is finished
    by calling this again. `names`: the new set's files besides the manifest; `replaces(name)`: whether a
    file in `out` belongs to the old set; `folders`: folders of the stage that replace their namesakes."""
    import shutil

    from dallecli.config import fsync_dir

    (out / "manifest.json").unlink(missing_ok=True)  # from here on `out` is incomplete until the new one lands
    for p in out.iterdir():
        if p.is_file() and replaces(p.name) and p.name not in names:
            p.unlink()
    for name in sorted(names):
        if (stage / name).exists():  # not there: moved before a crash
            os.replace(stage / name, out / name)
    for name in folders:
        if (stage / name).is_dir():
            shutil.rmtree(out / name, ignore_errors=True)
            os.replace(stage / name, out / name)
    os.replace(stage / "manifest.json", out / "manifest.json")
    fsync_dir(out)
    shutil.rmtree(stage, ignore_errors=True)
