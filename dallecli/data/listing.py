"""Listing a source (main process): which inputs a folder, a manifest, WebDataset shards or a built-in renderer
hold, in a fixed order (sorted folder walk, manifest row order, shard order), as a `sources.Source` of
`Item`s, and the signature of the files read (a rerun over changed inputs is refused)."""
from __future__ import annotations

import csv
import hashlib
import importlib
import itertools
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from dallecli.console import UserError, counted, info
from dallecli.data.fetch import is_url
from dallecli.data.images import Rejected
from dallecli.data.sources import (BUILTIN, CAPTION_COLUMNS, IMAGE_COLUMNS, IMAGE_SUFFIXES, MANIFEST_SUFFIXES,
                                   SHARD_IMAGE_EXTS, TAR_SUFFIXES, Item, KeyNumbering, Source, SourceSpec,
                                   make_key, unique_keys)


def files_signature(root: Path, paths: Iterable[Path]) -> dict[str, Any]:
    """{"files", "digest"} of the files that exist among `paths`: their names relative to `root`, sizes and
    modification times (no contents read: cheap on a million files)."""
    h, n = hashlib.sha256(), 0
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            continue
        rel = os.path.relpath(path, root) if path != root else path.name
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "backslashreplace"))
        n += 1
    return {"files": n, "digest": h.hexdigest()[:16]}


# ---- listing sources (main process) -------------------------------------------------------------

def detect_kind(path: Path) -> str:
    """folder, manifest or webdataset, from what is at `path`; ambiguity is a UserError."""
    if path.is_file():
        name = path.name.lower()
        if path.suffix.lower() in MANIFEST_SUFFIXES:
            return "manifest"
        if name.endswith(TAR_SUFFIXES):
            return "webdataset"
        raise UserError(f"cannot tell what {path} is: expected a folder, a manifest "
                        f"({', '.join(MANIFEST_SUFFIXES)}) or a .tar shard; pass --source")
    if not path.is_dir():
        raise UserError(f"input {path} does not exist; give a folder of images, a manifest or shards")
    tars = [p for p in path.iterdir() if p.name.lower().endswith(TAR_SUFFIXES)]
    images = next((True for _ in _walk_images(path)), False)
    if tars and images:
        raise UserError(f"{path} holds both .tar shards and image files; pass --source folder or "
                        "--source webdataset")
    if tars:
        return "webdataset"
    if images:
        return "folder"
    raise UserError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no .tar shards")


# Files that mark a folder as written by a dalle command (a run, its samples, an evaluation's samples, a
# training output, an encode preview): such a folder inside an input folder is not read as input.
DALLE_MARKERS = (("shards", "manifest.json"), ("demo.json",), ("sampling.json",), ("train_config.json",),
                 ("preview.jsonl",))


def written_by_dalle(folder: str | Path) -> bool:
    return any(os.path.isfile(os.path.join(folder, *marker)) for marker in DALLE_MARKERS)


def _walk_images(root: Path, skip: Iterable[Path] = (),
                 skipped: list[str] | None = None) -> Iterator[tuple[Path, Path]]:
    """(image file, its caption file) under `root`, recursively, in sorted order. Hidden files and folders, the
    folders in `skip` (absolute paths) and folders written by dalle (`written_by_dalle`, listed in `skipped`)
    are left out. The caption is found in the folder's listing (`_caption_name`): no file system call per
    image."""
    skip = {os.path.abspath(p) for p in skip}
    for dirpath, dirnames, filenames in os.walk(root):
        keep = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            if d.startswith(".") or os.path.abspath(full) in skip:
                continue
            if written_by_dalle(full):
                if skipped is not None:
                    skipped.append(os.path.relpath(full, root))
                continue
            keep.append(d)
        dirnames[:] = keep
        names = set(filenames)
        for name in sorted(filenames):
            if name == "ranked.png" and "samples.jsonl" in names:  # `dalle rerank --images` wrote the pair here
                if skipped is not None:
                    skipped.append(os.path.relpath(os.path.join(dirpath, name), root))
                continue
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                folder = Path(dirpath)
                yield folder / name, folder / _caption_name(name, names)


def folder_source(root: Path, skip: Iterable[Path] = ()) -> Source:
    """Images with captions in same-stem .txt files beside them (`cat.jpg` + `cat.txt`); the folders in `skip`
    (the output folder, when it lies inside the input) and folders that dalle wrote (a run folder, samples)
    are not read, and the latter are named in one line."""
    skipped: list[str] = []
    pairs = list(_walk_images(root, skip, skipped))
    files = [image for image, _ in pairs]
    if skipped:
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        rankings = sum(os.path.basename(s) == "ranked.png" for s in skipped)
        what = " and ".join(([counted(len(skipped) - rankings, "folder")] if len(skipped) > rankings else [])
                            + ([f"{rankings} ranked.png"] if rankings else []))
        info(f"not read as input: {what} written by dalle under {root} ({', '.join(skipped[:3])}{more})")
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")

    def items() -> Iterator[Item]:
        keys = KeyNumbering()
        for path, caption in pairs:
            rel = path.relative_to(root)
            # the stem names the sample: dup.png + dup.jpg share dup.txt, a real duplicate (one key)
            yield Item(key=keys.key(str(rel.with_suffix(""))), source=str(rel), image=path, caption=caption)

    inputs = files_signature(root, itertools.chain(files, (caption for _, caption in pairs)))
    return Source("folder", unique_keys(items()), len(files), {**inputs, "files": len(files), "unit": "images"})


def _caption_name(image: str, names: set[str]) -> str:
    """The name of an image's caption file among its folder's file `names`: same stem, `.txt`, `.TXT` or `.Txt`
    (cameras and some tools write `.TXT`, as they write `.JPG`); `stem.txt` where none exists, for the message
    that says it is missing."""
    stem = os.path.splitext(image)[0]
    return next((stem + suffix for suffix in (".txt", ".TXT", ".Txt") if stem + suffix in names), stem + ".txt")


def _manifest_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """(line or row number, row or None when unreadable, problem)."""
    delimiter = MANIFEST_SUFFIXES[path.suffix.lower()]
    # surrogateescape: a caption with invalid UTF-8 rejects that row, not the whole manifest
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        if delimiter is None:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield n, None, f"line {n} is not JSON ({exc.msg})"
                    continue
                yield (n, row, "") if isinstance(row, dict) else (n, None, f"line {n} is not a JSON object")
        else:
            reader = csv.DictReader(f, delimiter=delimiter)
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:       # an over-long field, a NUL byte: skip the row, keep reading
                    yield reader.line_num, None, f"line {reader.line_num}: {exc}"
                    continue
                yield reader.line_num, row, ""


def _manifest_columns(path: Path) -> list[str]:
    delimiter = MANIFEST_SUFFIXES[path.suffix.lower()]
    with path.open("rb") as f:
        head = f.read(4096)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in head.split(b"\n", 1)[0]:
        raise UserError(f"manifest {path} is UTF-16 text (a spreadsheet's 'Unicode text' export); save it as UTF-8 "
                        "(e.g. 'CSV UTF-8') and rerun")
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        if delimiter is not None:
            header = next(csv.reader(f, delimiter=delimiter), [])
            if not any(name.strip() for name in header) and not f.read().strip():
                header_row = "image,caption" if delimiter == "," else "image<TAB>caption"
                raise UserError(f"manifest {path} is empty: write a header row naming the columns (e.g. "
                                f"{header_row}), then one row per image")
            return header
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"{path}: the first line is not JSON; a .jsonl manifest holds one "
                                    "JSON object per line") from None
                return list(row) if isinstance(row, dict) else []
    raise UserError(f"manifest {path} is empty: write one JSON object per line, e.g. "
                    '{"image": "cat.jpg", "caption": "a cat"}')


def _pick_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str,
                 flag: str, path: Path) -> str:
    sep = MANIFEST_SUFFIXES.get(path.suffix.lower())
    other = next((d for d in (";", "\t", ",", "|") if sep is not None and d != sep
                  and len(columns) == 1 and d in columns[0]), None)
    if other is not None:  # one column whose name holds another separator: a semicolon CSV (European Excel)
        raise UserError(f"{path}: its header {columns[0]!r} is one column when split at {sep!r}; the file seems "
                        f"to use {other!r} between columns: save it with {sep!r} as separator")
    if wanted is not None:
        if wanted not in columns:
            raise UserError(f"{path} has no {what} column {wanted!r} (columns: {', '.join(columns) or 'none'}); "
                            f"fix {flag}")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise UserError(f"{path}: no {what} column found among {', '.join(columns) or 'no columns'}; "
                    f"name it with {flag}")


def manifest_source(path: Path, image_column: str | None, caption_column: str | None) -> Source:
    """Rows with an image (a path relative to the manifest, or an http(s) URL) and a caption. A `key`
    column, when present, names the samples; otherwise they are numbered by row."""
    columns = _manifest_columns(path)
    image_col = _pick_column(columns, image_column, IMAGE_COLUMNS, "image", "--image-column", path)
    caption_col = _pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", "--caption-column", path)
    total = sum(1 for _ in _manifest_rows(path))
    if not total:
        raise UserError(f"manifest {path} holds a header but no rows: add one row per image "
                        f"({image_col}, {caption_col})")
    base = path.parent

    def items() -> Iterator[Item]:
        keys = KeyNumbering()  # a `key` column's values, as for file names
        for index, (line, row, problem) in enumerate(_manifest_rows(path)):
            key = f"{index:09d}"
            where = f"{path.name}:{line}"
            if row is None:
                yield Item(key, where, None, None, reject=Rejected("manifest-bad-row", problem))
                continue
            if row.get("key") not in (None, ""):
                key = keys.key(str(row["key"]))
            image = row.get(image_col)
            caption = row.get(caption_col)
            caption = None if caption is None else str(caption)
            meta: dict[str, Any] = {}
            if not isinstance(image, str) or not image.strip():
                yield Item(key, where, None, caption, reject=Rejected("image-missing", f"empty {image_col!r}"))
                continue
            image = image.strip()
            if is_url(image):
                meta["url"] = image
                target: Path | str = image
            else:
                target = base / image
            yield Item(key, f"{where}: {image[:200]}", target, caption, meta)

    return Source("manifest", unique_keys(items()), total, files_signature(path.parent, [path]))


def webdataset_source(path: Path) -> Source:
    """Existing shards (img2dataset output: `KEY.jpg` + `KEY.txt` [+ `KEY.json`]), read as raw bytes:
    only image, txt and json members are looked at, nothing is ever unpickled."""
    from dallecli.data.records import iter_records

    tars = [path] if path.is_file() else sorted(p for p in path.iterdir()
                                                if p.name.lower().endswith(TAR_SUFFIXES))
    if not tars:
        raise UserError(f"no .tar shards in {path}")
    if path.is_file() and not tarfile.is_tarfile(path):
        raise UserError(f"{path} is not a tar file; --source webdataset reads .tar shards (a manifest is "
                        "--source manifest)")

    def items() -> Iterator[Item]:
        keys = KeyNumbering()  # the same key in two tars: a duplicate; `x y` beside `x_y`: two samples
        for tar in tars:
            errors: list = []
            for record in iter_records(tar, errors):
                ext = next((e for e in SHARD_IMAGE_EXTS if e in record.members), None)
                meta: dict[str, Any] = {}
                if "json" in record.members:
                    try:
                        url = json.loads(record.members["json"]).get("url")
                        if isinstance(url, str):
                            meta["url"] = url
                    except (ValueError, AttributeError):
                        pass
                yield Item(keys.key(record.key), f"{tar.name}:{record.key}",
                           record.members[ext] if ext else None, record.members.get("txt"), meta)
            for e in errors:
                yield Item(make_key(e.key or ""), f"{tar.name}:{e.key or ''}", None, None,
                           reject=Rejected("corrupt-shard", e.reason))

    return Source("webdataset", unique_keys(items()), None,
                  files_signature(path if path.is_dir() else path.parent, tars))


def shapes_source(spec: SourceSpec, size: int, val_fraction: float) -> Source:
    """The shapes world (specs/shapes-world.md): train scenes from its 'train' split, val from 'val'."""
    shapes = importlib.import_module("dallecli.data.shapes")
    count = 10000 if spec.count is None else spec.count
    seed = 0 if spec.seed is None else spec.seed
    n_val = round(count * val_fraction)
    n_train = count - n_val

    def items() -> Iterator[Item]:
        for split, n in (("train", n_train), ("val", n_val)):
            if n == 0:
                continue
            for key, image, caption, meta in shapes.iter_scenes(split, n, seed, size):
                if meta.get("split") not in ("train", "val"):
                    raise ValueError(f"shapes renderer gave split {meta.get('split')!r} for {key}")
                yield Item(key, "shapes", image, caption, dict(meta), split=meta["split"])

    return Source("shapes", unique_keys(items()), count)


def emoji_source(spec: SourceSpec, size: int) -> Source:
    emoji = importlib.import_module("dallecli.data.emoji")
    font = None if spec.font is None else Path(spec.font)

    def items() -> Iterator[Item]:
        for key, image, caption, meta in emoji.iter_emoji(font, size, spec.skin_tones, spec.flags):
            yield Item(key, "emoji", image, caption, dict(meta))

    return Source("emoji", unique_keys(items()), None)


def open_source(spec: SourceSpec, size: int, val_fraction: float, skip: Iterable[Path] = ()) -> Source:
    """The source `spec` names; a folder source leaves out the folders in `skip`."""
    if spec.kind in BUILTIN:
        return shapes_source(spec, size, val_fraction) if spec.kind == "shapes" else emoji_source(spec, size)
    path = Path(spec.path) if spec.path else None
    if path is None:
        raise UserError(f"--source {spec.kind} needs an input path, e.g. `dalle build-shards photos/`")
    if not path.exists():
        raise UserError(f"input {path} does not exist")
    if spec.kind == "folder":
        if not path.is_dir():
            raise UserError(f"--source folder needs a folder, but {path} is a file")
        return folder_source(path, skip)
    if spec.kind == "manifest":
        if not path.is_file() or path.suffix.lower() not in MANIFEST_SUFFIXES:
            raise UserError(f"--source manifest needs a {', '.join(MANIFEST_SUFFIXES)} file, got {path}")
        return manifest_source(path, spec.image_column, spec.caption_column)
    return webdataset_source(path)
