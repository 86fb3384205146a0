"""What `dalle eval` reads: the reference images (val split of the run's shards) and the candidates of a
samples.jsonl, grouped per prompt, and how one candidate per prompt is chosen (the best of the first k by
CLIP score: Fig. 9c's reranking).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from dallecli.config import read_json, read_utf8
from dallecli.console import UserError, warn
from dallecli.evaluate.fid import ImageRef


# --- references ---------------------------------------------------------------------------------------------

@dataclass
class References:
    images: list[ImageRef]
    captions: list[str]
    sides: Counter
    identity: dict  # what the cache key needs to know about the data


def read_references(shards: Path, count: int, flag: str | None = None) -> References:
    """The first `count` readable val samples (image location, caption) in shard order. `flag` names the
    count in the warning when the val split holds fewer (default "--count COUNT")."""
    import hashlib
    import io

    from PIL import Image

    from dallecli.data.loader import BadSample, ShardIndex, read_caption
    from dallecli.data.records import IMAGE_EXTS

    errors: list[dict] = []
    index = ShardIndex(shards, "val", errors)
    images, captions, sides, skipped = [], [], Counter(), 0
    content = hashlib.blake2b(digest_size=16)  # the images' bytes: rebuilt shards of the same sizes differ here
    for i, entry in enumerate(index.entries):
        if len(images) == count:
            break
        members = dict((ext, (off, n)) for ext, off, n in entry.members)
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        try:
            _, data = index.read(i)
            caption = read_caption(data)
            if ext is None:
                raise BadSample("no image member")
            with Image.open(io.BytesIO(data[ext])) as im:  # the header only: size, no decoding
                w, h = im.size
        except (BadSample, OSError) as exc:
            skipped += 1
            if skipped <= 3:
                warn(f"skipping val sample {entry.key}: {exc}")
            continue
        off, n = members[ext]
        images.append(ImageRef(str(index.paths[entry.shard]), off, n))
        content.update(data[ext])
        captions.append(caption)
        sides[min(w, h)] += 1
    if len(images) < 2:
        raise UserError(f"the val shards in {shards} hold {len(images)} readable image(s); FID needs at least 2 "
                        "(rebuild the shards with a larger --val-fraction)")
    if len(images) < count:
        warn(f"the val split holds {len(images)} readable images, fewer than {flag or f'--count {count}'}; "
             f"using all {len(images)}")
    used = sorted({r.path for r in images})
    identity = {"shards": [(Path(p).name, Path(p).stat().st_size) for p in used], "count": len(images),
                "skipped": skipped, "content": content.hexdigest()}
    return References(images, captions, sides, identity)


def shapes_world(shards: Path, captions: list[str]) -> int | None:
    """The shapes world's seed when the shards were rendered from it (or every caption is a shapes caption)."""
    from dallecli.evaluate.shapes_check import parse_caption

    manifest = Path(shards) / "manifest.json"
    source = read_json(manifest, "shard manifest").get("arguments", {}).get("source", {}) if manifest.is_file() else {}
    if isinstance(source, dict) and source.get("kind") == "shapes":
        return int(source.get("seed", 0))
    if isinstance(source, dict) and source.get("kind"):  # built from the user's own data, which may be captioned
        return None                                      # like shapes scenes without being the shapes world
    # Shards another tool made (no manifest of ours): the shapes world when every caption is a shapes caption
    return 0 if captions and all(parse_caption(c) is not None for c in captions) else None


# --- samples ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    prompt: str
    image: ImageRef
    index: int            # the candidate's number among its prompt's draws
    score: float | None   # the sampler's CLIP score, when it reranked
    kept: bool | None
    uid: int              # position in the samples file: a key for per-candidate results


def read_samples(path: Path, max_missing: float, uid_start: int = 0) -> tuple[list[list[Candidate]], dict]:
    """samples.jsonl → candidates grouped per prompt, in file order. Missing and unreadable image files are
    counted (as `dalle rerank` counts them); more than `max_missing` of them is a UserError."""
    from PIL import Image

    path = Path(path)
    groups: dict[tuple, list[Candidate]] = {}
    seen: Counter = Counter()
    listed, missing = 0, []
    for n, line in enumerate(read_utf8(path, "samples file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, image = str(row["prompt"]), str(row["image"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path} line {n} is not a sample (a JSON object with 'prompt' and 'image')") from None
        listed += 1
        file = Path(image) if Path(image).is_absolute() else path.parent / image
        try:
            with Image.open(file) as im:  # the header, and a PNG's checksums: no decoding
                im.verify()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):  # not there, or not one Pillow reads
            missing.append(str(file))
            continue
        index = int(row.get("index", 0))
        if "prompt_index" in row:
            key = ("i", int(row["prompt_index"]))
        else:  # the same prompt twice: its second draw of index j starts a second group
            key = ("p", prompt, seen[(prompt, index)])
            seen[(prompt, index)] += 1
        score = row.get("clip_score")
        groups.setdefault(key, []).append(Candidate(prompt, ImageRef(str(file)), index,
                                                    None if score is None else float(score),
                                                    None if "kept" not in row else bool(row["kept"]),
                                                    uid_start + listed - 1))
    if listed and len(missing) > max_missing * listed:
        raise UserError(f"{len(missing)} of the {listed} images listed in {path} are missing or unreadable (first: "
                        f"{missing[0]}); regenerate them or raise --max-missing")
    if missing:
        warn(f"{len(missing)} of the {listed} images listed in {path} are missing or unreadable: evaluated without "
             "them")
    ordered = [sorted(g, key=lambda c: c.index) for g in groups.values()]
    return ordered, {"listed": listed, "missing": len(missing)}


def mark_selected(path: Path, chosen: list[Candidate], uid_start: int = 0) -> None:
    """Rewrite samples.jsonl's "kept" flags as the evaluation's selection: a later `dalle eval --samples` of
    the file (which takes the kept candidates when marked) then measures the same images."""
    from dallecli.rerank import write_samples

    path, uids = Path(path), {c.uid for c in chosen}
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for j, row in enumerate(rows):
        row["kept"] = uid_start + j in uids
    write_samples(path, rows)


def select(groups: list[list[Candidate]], k: int | None, score: dict[int, float] | None) -> list[Candidate]:
    """One sample per prompt: the best of its first k candidates by CLIP score; k None: the kept ones
    when the sampler marked them, else every candidate."""
    chosen = []
    for group in groups:
        if k is None:
            kept = [c for c in group if c.kept]
            chosen += kept if any(c.kept is not None for c in group) else group
        elif k == 1 or len(group) == 1:
            chosen.append(group[0])
        else:
            if score is None:
                raise UserError("reranking needs CLIP scores: the samples carry none and no CLIP is available (--clip)")
            chosen.append(max(group[:k], key=lambda c: score[c.uid]))
    return chosen
