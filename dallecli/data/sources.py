"""Where samples come from: a folder of images + captions, a manifest (CSV/TSV/JSONL, paths or URLs),
existing WebDataset shards, or a built-in renderer (emoji, shapes).

Every source is a deterministic, ordered stream of `Item`s (what to read, not yet read). `prepare_batch`
turns items into `Prepared` samples or rejections; it runs in worker processes, so it only touches the
item and its config. Listing is cheap and happens in the main process, in a fixed order: sorted
folder walk, manifest row order, shard order (`listing.py`: `open_source`).
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from PIL import Image

from dallecli.data.fetch import FetchConfig, fetch_url
from dallecli.data.images import EncodedImage, ImageConfig, Rejected, process_image

KINDS = ("folder", "manifest", "webdataset", "emoji", "shapes")
BUILTIN = ("emoji", "shapes")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MANIFEST_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".ndjson": None}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")  # tried in this order
IMAGE_COLUMNS = ("image", "url", "path", "file", "filename", "image_path", "img")
CAPTION_COLUMNS = ("caption", "text", "txt", "title", "alt")


@dataclass(frozen=True)
class SourceSpec:
    kind: str
    path: str | None = None                 # resolved input path (None for built-ins)
    image_column: str | None = None          # manifest columns; None: the first of IMAGE_COLUMNS / CAPTION_COLUMNS
    caption_column: str | None = None
    count: int | None = None                 # shapes: total scenes (train + val)
    seed: int | None = None                  # shapes
    font: str | None = None                  # emoji
    skin_tones: bool = False
    flags: bool = False


@dataclass(frozen=True)
class PrepareConfig:
    image: ImageConfig = field(default_factory=ImageConfig)
    min_caption_chars: int = 3       # App. C: captions that are too short are discarded
    max_caption_chars: int = 1000
    fetch: FetchConfig = field(default_factory=FetchConfig)
    content_hash: bool = False       # compute a hash of the image bytes for --dedup


@dataclass
class Item:
    """One input, not yet read. `image`: a file, an http(s) URL, bytes from a shard, or a rendered image.
    `caption`: a .txt file, bytes from a shard, or text (manifest / renderer)."""

    key: str
    source: str                                  # where it came from, for rejects.jsonl
    image: Path | str | bytes | Image.Image | None
    caption: Path | bytes | str | None
    meta: dict[str, Any] = field(default_factory=dict)   # carried into the sample's json
    split: str | None = None                     # decided by the source (shapes); else by a hash of the key
    reject: Rejected | None = None               # decided while listing (duplicate key, bad manifest row)


@dataclass
class Prepared:
    key: str
    source: str
    split: str | None
    meta: dict[str, Any]
    image: EncodedImage | None = None
    caption: str | None = None
    content_hash: str | None = None
    reject: Rejected | None = None


@dataclass
class Source:
    kind: str
    items: Iterator[Item]
    total: int | None          # number of items when known in advance (for the progress bar)
    # What the inputs are on disk: {"files": n, "digest": …[, "unit": "images"]}, the digest over the names,
    # sizes and modification times of the files read (None for the built-in sources). A rerun over changed
    # inputs is refused, not skipped.
    inputs: dict[str, Any] | None = None


# ---- keys and captions -------------------------------------------------------------------------

_KEY_BAD = re.compile(r"[^\w\-]+")


def make_key(text: str) -> str:
    """A WebDataset-safe key: the key ends at the first dot of a member name, so dots, slashes and other
    punctuation become '_' (`KeyNumbering` tells the collisions this creates apart from real duplicates)."""
    return _KEY_BAD.sub("_", text).strip("_")


class KeyNumbering:
    """Sample keys from names as the source gives them. The same name gets the same key (a duplicate, which
    `unique_keys` rejects); different names that `make_key` maps to one key (`x y` and `x_y`) are different
    samples: the later one, in listing order (sorted, so reproducible and resumable), takes the first free
    `KEY_2`, `KEY_3`, …."""

    def __init__(self) -> None:
        self.taken: set[str] = set()
        self.of: dict[str, str] = {}

    def key(self, name: str) -> str:
        if name not in self.of:
            key = base = make_key(name)
            n = 2
            while base and key in self.taken:
                key, n = f"{base}_{n}", n + 1
            self.taken.add(key)
            self.of[name] = key
        return self.of[name]


def unique_keys(items: Iterable[Item]) -> Iterator[Item]:
    """The first item with a key keeps it; later ones are rejected as duplicates, naming the first."""
    seen: dict[str, str] = {}
    for item in items:
        if item.reject is None:
            if not item.key:
                item.reject = Rejected("bad-key", "empty key")
            elif item.key in seen:
                first = seen[item.key]  # a tar member set repeated in one tar has the same source as the first
                where = "earlier in the same shard" if first == item.source else f"by {first}"
                item.reject = Rejected("duplicate-key", f"key {item.key!r} already used {where}")
            else:
                seen[item.key] = item.source
        yield item


def load_caption(caption: Path | bytes | str | None) -> str:
    if caption is None:
        raise Rejected("caption-missing", "no caption")
    if isinstance(caption, Path):
        try:
            caption = caption.read_bytes()
        except FileNotFoundError:
            raise Rejected("caption-missing", f"no caption file {caption.name}") from None
        except OSError as exc:
            raise Rejected("caption-unreadable", str(exc)) from None
    if isinstance(caption, bytes):
        try:
            return caption.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise Rejected("caption-not-utf8", str(exc)) from None
    try:
        caption.encode("utf-8")          # manifests are read with surrogateescape: invalid bytes show here
    except UnicodeEncodeError:
        raise Rejected("caption-not-utf8", "caption holds bytes that are not UTF-8") from None
    return caption


def clean_caption(text: str, min_chars: int, max_chars: int) -> str:
    """Strip, turn control characters into spaces, collapse runs of whitespace; enforce the length limits."""
    text = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)
    text = " ".join(text.split())
    if not text:
        raise Rejected("caption-empty", "caption is empty or only whitespace")
    if len(text) < min_chars:
        raise Rejected("caption-too-short", f"{len(text)} characters < --min-caption-chars {min_chars}")
    if len(text) > max_chars:
        raise Rejected("caption-too-long", f"{len(text)} characters > --max-caption-chars {max_chars}")
    return text


# ---- preparing items (runs in worker processes) -------------------------------------------------

def _read_image(image: Path | str | bytes | Image.Image | None, config: FetchConfig) -> bytes | Image.Image:
    if image is None:
        raise Rejected("image-missing", "no image")
    if isinstance(image, Path):
        try:
            return image.read_bytes()
        except FileNotFoundError:
            raise Rejected("image-missing", f"no file {image}") from None
        except OSError as exc:
            raise Rejected("image-unreadable", str(exc)) from None
    if isinstance(image, str):
        return fetch_url(image, config)
    return image


def _content_hash(data: bytes | Image.Image) -> str:
    if isinstance(data, Image.Image):
        data = f"{data.mode} {data.size}".encode() + data.tobytes()
    return hashlib.sha256(data).hexdigest()


def prepare_batch(items: list[Item], config: PrepareConfig) -> list[Prepared]:
    """Items → encoded samples or rejections, in order. URLs in the batch download concurrently."""
    out = [Prepared(it.key, it.source, it.split, it.meta, reject=it.reject) for it in items]
    for p, it in zip(out, items):
        if p.reject is None:
            try:
                p.caption = clean_caption(load_caption(it.caption), config.min_caption_chars,
                                          config.max_caption_chars)
            except Rejected as exc:
                p.reject = exc
    live = [i for i, p in enumerate(out) if p.reject is None]

    def read(i: int) -> bytes | Image.Image | Rejected:
        try:
            return _read_image(items[i].image, config.fetch)
        except Rejected as exc:
            return exc

    urls = [i for i in live if isinstance(items[i].image, str)]
    if len(urls) > 1:
        with ThreadPoolExecutor(min(len(urls), config.fetch.threads)) as pool:
            data = dict(zip(live, pool.map(read, live)))
    else:
        data = {i: read(i) for i in live}
    for i in live:
        p, d = out[i], data.pop(i)
        try:
            if isinstance(d, Rejected):
                raise d
            if config.content_hash:
                p.content_hash = _content_hash(d)
            p.image = process_image(d, config.image)
        except Rejected as exc:
            p.reject = exc
    return out
