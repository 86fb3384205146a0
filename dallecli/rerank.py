"""Reranking samples with a contrastive model (§2.6): score every (image, prompt) pair, rank per prompt.

The paper draws N samples per caption and keeps the top k by CLIP score. Here a sample folder's
samples.jsonl (one JSON object per line: prompt, image path relative to the file, seed, index, logprob, …)
gains "clip_score" (the cosine of image and prompt embeddings), "rank" (1 = best within its prompt) and,
with `keep`, "kept" (true for the top `keep` of each prompt). Every other field and the line order stay
as they were; the file is replaced atomically.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from dallecli.config import read_utf8, usual_mode
from dallecli.console import UserError, info, progress, warn
from dallecli.data.images import upright_rgb8
from dallecli.imageutil import center_square, grid

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")  # what build-shards reads


class Scorer(Protocol):
    """What reranking needs of a CLIP (dallecli.models.clip.ClipScorer is one)."""

    name: str
    batch_size: int

    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor: ...  # (N, D), normalised
    def text_features(self, texts: Sequence[str]) -> torch.Tensor: ...  # (M, D), normalised


# --- samples.jsonl ------------------------------------------------------------------------------------------

def read_samples(path: Path) -> list[dict[str, Any]]:
    """The rows of a samples.jsonl; each must be an object with a "prompt" and an "image" string."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no samples file at {path}; make one with `dalle sample`, or pass --images FOLDER --prompt TEXT")
    rows = []
    for n, line in enumerate(read_utf8(path, "samples file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{n}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("image"), str):
            raise UserError(f'{path}:{n}: expected an object with a "prompt" and an "image" string')
        rows.append(row)
    if not rows:
        raise UserError(f"{path} lists no samples")
    return rows


def write_samples(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace samples.jsonl atomically (temporary file beside it, fsync, rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    usual_mode(tmp)  # index.html reads it: not owner-only
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def folder_samples(folder: Path, prompt: str, root: Path | None = None) -> list[dict[str, Any]]:
    """Rows for every image in a folder, all with one prompt (`dalle rerank --images FOLDER --prompt TEXT`).
    "image" is relative to `root`, the folder the samples.jsonl goes in (default: `folder` itself)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--images {folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    # The contact sheets our commands leave: rerank's ranked.png, and the grid.png of a `dalle sample` folder
    ours = {"ranked.png"} | ({"grid.png"} if any((folder / m).is_file() for m in ("sampling.json", "samples.jsonl"))
                             else set())
    if skipped := sorted(p.name for p in files if p.name in ours):
        info(f"not scoring {', '.join(skipped)} in {folder}: a grid an earlier dalle command made")
    files = [p for p in files if p.name not in ours]
    if not files:
        raise UserError(f"--images {folder}: no images there ({'/'.join(IMAGE_SUFFIXES)})")
    root = folder if root is None else Path(root)
    return [{"prompt": prompt, "image": _relative(p, root), "index": i} for i, p in enumerate(files)]


def _relative(path: Path, root: Path) -> str:
    """`path` as written in a samples.jsonl in `root`: relative where it can be, so the two can move together."""
    try:
        return Path(os.path.relpath(path.resolve(), root.resolve())).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists
        return str(path.resolve())


# --- which CLIP ---------------------------------------------------------------------------------------------

def check_clip_model(spec: str | None, model: str | None, run: Path) -> None:
    """Refuse a --clip-model that the CLIP `spec` would ignore. It names the architecture of a bare weights
    file only: our checkpoints (a folder, a file inside one, the run's own) and NAME:TAG / local-dir: /
    hf-hub: specs carry their own, so a different name there is an error naming both."""
    if model is None:
        return
    from dallecli import checkpoint
    from dallecli.config import RunDir

    if spec is None:
        folder = RunDir(Path(run)).clip
    elif spec.startswith(("local-dir:", "hf-hub:")):
        raise UserError(f"--clip {spec} carries its own architecture; --clip-model {model} applies only to a bare "
                        "weights file: drop --clip-model")
    elif Path(spec).is_dir():
        folder = Path(spec)
    elif Path(spec).is_file():
        folder = Path(spec).parent
        if not ((folder / "config.json").is_file() and (folder / "DONE").is_file()):
            return  # a bare weights file: --clip-model is its architecture
    elif ":" in spec and not spec.startswith(("/", ".", "~")):
        if spec.split(":", 1)[0] != model:
            raise UserError(f"--clip {spec} is the architecture {spec.split(':', 1)[0]}, but --clip-model says "
                            f"{model}: drop --clip-model (it names the architecture of a bare weights file only)")
        return
    else:
        return  # not a CLIP at all: load_clip says what is wrong
    try:
        own = checkpoint.load(folder, "clip").model_config.get("name")
    except UserError:
        return  # not a readable CLIP checkpoint: load_clip says what is wrong
    if own != model:
        where = "the run's CLIP " + str(folder) if spec is None else f"--clip {spec}"
        raise UserError(f"{where} is a {own} checkpoint (its config.json says so), but --clip-model says "
                        f"{model}: drop --clip-model (it names the architecture of a bare weights file only)")


# --- scoring and ranking ------------------------------------------------------------------------------------

def _open(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as im:
            return upright_rgb8(im)  # as the training images were made: transparency on white, EXIF turned
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None  # unreadable, or far more pixels than any sample (a decompression bomb): counted as missing


def _group(row: dict[str, Any]) -> tuple:
    """Which prompt's candidates a row is among: its prompt_index where the sampler wrote one (one caption may
    be asked twice, as separate prompts), else its text."""
    return ("i", row["prompt_index"]) if "prompt_index" in row else ("p", row["prompt"])


def rank_rows(rows: list[dict[str, Any]], keep: int | None = None) -> None:
    """Set "rank" (1 = highest clip_score within a prompt; ties keep file order) and, with `keep`, "kept" (the
    best `keep`). Without `keep`, rows already marked "kept" stay marked as many per prompt as before, now the
    best by these ranks: a rerank with another CLIP moves the marks with the order."""
    by_prompt: dict[Any, list[dict]] = defaultdict(list)
    marked: dict[Any, int] = defaultdict(int)
    for row in rows:
        group = _group(row)
        marked[group] += row.get("kept") is True
        if row.get("clip_score") is None:
            row["rank"] = None
            if keep is not None or "kept" in row:
                row["kept"] = False
        else:
            by_prompt[group].append(row)
    for prompt, group in by_prompt.items():
        limit = keep if keep is not None else marked[prompt]
        for r, row in enumerate(sorted(group, key=lambda x: -x["clip_score"]), 1):  # sorted() is stable
            row["rank"] = r
            if keep is not None or "kept" in row:
                row["kept"] = r <= limit


def score_rows(rows: list[dict[str, Any]], root: Path, scorer: Scorer) -> list[str]:
    """Add "clip_score" (cosine of image and prompt) to each row whose image opens; returns the images that did not."""
    prompts = list(dict.fromkeys(row["prompt"] for row in rows))
    text = scorer.text_features(prompts)  # (P, D): each prompt encoded once
    which = {p: i for i, p in enumerate(prompts)}
    missing: list[str] = []
    step = max(1, scorer.batch_size)
    with progress("rerank", total=len(rows), unit="img") as bar:
        for lo in range(0, len(rows), step):
            batch = rows[lo: lo + step]
            images = [_open(root / row["image"]) for row in batch]
            good = [(row, im) for row, im in zip(batch, images) if im is not None]
            for row, im in zip(batch, images):
                if im is None:
                    missing.append(row["image"])
                    row["clip_score"] = None
            if good:
                feats = scorer.image_features([im for _, im in good])  # (n, D)
                idx = torch.tensor([which[row["prompt"]] for row, _ in good])
                cos = (feats * text[idx]).sum(-1)  # (n,)
                for (row, _), c in zip(good, cos.tolist()):
                    row["clip_score"] = round(c, 6)
            bar.advance(len(batch))
    return missing


def rerank_samples(samples_jsonl: Path, scorer: Scorer, keep: int | None = None, *,
                   max_missing: float = 0.1, rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Score and rank the samples listed in `samples_jsonl` (images relative to it) and write the file back.

    Adds "clip_score", "rank" and "clip" (the scorer's name) to every row, and "kept" (the top `keep` per
    prompt) when `keep` is given. Images that are missing or unreadable get clip_score null; more than
    `max_missing` of them (a fraction of all rows) stops with an error before anything is written.
    `rows` replaces the file's contents (used to create a samples.jsonl for a folder of images).
    """
    samples_jsonl = Path(samples_jsonl)
    if keep is not None and keep < 1:
        raise UserError(f"--keep must be at least 1 (got {keep})")
    listed = f" listed in {samples_jsonl}" if rows is None else ""  # not yet written for a folder of images
    rows = read_samples(samples_jsonl) if rows is None else rows
    missing = score_rows(rows, samples_jsonl.parent, scorer)
    if missing:
        share = len(missing) / len(rows)
        message = (f"{len(missing)} of {len(rows)} images{listed} are missing or unreadable "
                   f"(first: {samples_jsonl.parent / missing[0]})")
        if share > max_missing or len(missing) == len(rows):
            raise UserError(f"{message}; more than {max_missing:.0%}: nothing was written. Fix the paths "
                            "or raise --max-missing")
        warn(f"{message}; they get clip_score null and no rank")
    rank_rows(rows, keep)
    for row in rows:
        row["clip"] = scorer.name
    write_samples(samples_jsonl, rows)
    return rows


# --- the ranked grid ----------------------------------------------------------------------------------------

def ranked_grid(rows: list[dict[str, Any]], root: Path, cols: int = 8, tile: int = 128) -> Image.Image:
    """One row per prompt (in order of first appearance): a tile naming the prompt, then its best `cols`
    images, best first, each captioned with its rank and cosine."""
    by_prompt: dict[Any, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("rank") is not None:
            by_prompt[_group(row)].append(row)
    if not by_prompt:
        raise UserError("no scored samples to show")
    blank = Image.new("RGB", (tile, tile), (235, 235, 235))
    width = min(cols, max(len(g) for g in by_prompt.values()))
    images: list[Image.Image] = []
    captions: list[str] = []
    for group in by_prompt.values():
        best = sorted(group, key=lambda x: x["rank"])[:width]
        images.append(blank)
        captions.append(group[0]["prompt"])
        for row in best:
            im = _open(Path(root) / row["image"])
            images.append(center_square(im, tile) if im is not None else blank)
            captions.append(f"#{row['rank']}  {row['clip_score']:.3f}")
        for _ in range(width - len(best)):  # keep the rows aligned
            images.append(Image.new("RGB", (tile, tile), "white"))
            captions.append("")
    return grid(images, cols=width + 1, captions=captions)
