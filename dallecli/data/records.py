"""Reading shards as raw records: tar members grouped by key, no decoding, no pickle.

A shard is a WebDataset tar: for each sample, members `KEY.png` or `KEY.jpg` (image shards) or
`KEY.codes` (code shards: uint16 little-endian, row-major), `KEY.txt` (caption, UTF-8) and
`KEY.json` (metadata). Readers here only group bytes; decoding is the caller's choice, so nothing
can ever be unpickled from a shard (members such as `.pyd` / `.pth` / `.pickle` are never decoded).
"""
from __future__ import annotations

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


def iter_records(path: Path, errors: list[ShardError] | None = None) -> Iterator[Record]:
    """Yield the records of one tar shard in order. A truncated or corrupt tail ends the shard;
    it is appended to `errors` (if given) instead of raising."""
    path = Path(path)
    current: Record | None = None
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_member_name(info.name)
                f = tar.extractfile(info)
                data = f.read() if f is not None else b""
                if current is not None and key != current.key:
                    yield current
                    current = None
                if current is None:
                    current = Record(key=key, shard=path.name)
                current.members[ext] = data
    except (tarfile.TarError, EOFError, OSError) as exc:
        if errors is None:
            raise UserError(f"shard {path} is corrupt or truncated ({exc}); rebuild it with `dalle build-shards`")
        errors.append(ShardError(shard=path.name, key=current.key if current else None,
                                 reason=f"corrupt or truncated tar: {exc}"))
        # A record cut off mid-way is incomplete: drop it rather than yield half a sample.
        return
    if current is not None:
        yield current
