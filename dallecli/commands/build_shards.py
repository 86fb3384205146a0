"""`dalle build-shards`: images + captions from a folder, a manifest, existing shards or a built-in
renderer → 256² (App. C-filtered) WebDataset shards under RUN/shards, with manifest.json and rejects.jsonl."""
from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from dallecli.commands.common import DEFAULT_RUN, DebugOpt, QuietOpt, RunOpt


class SourceKind(str, enum.Enum):
    folder = "folder"
    manifest = "manifest"
    webdataset = "webdataset"
    emoji = "emoji"
    shapes = "shapes"


class ImageFormat(str, enum.Enum):
    png = "png"
    jpg = "jpg"


def _default_workers() -> int:
    import os

    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def command(
    path: Annotated[Optional[Path], typer.Argument(
        help="Input: a folder of images with same-stem .txt captions, a manifest (.csv/.tsv/.jsonl) or "
             "WebDataset shards (a .tar or a folder of them). Not needed for --source emoji/shapes.",
        show_default=False)] = None,
    source: Annotated[Optional[SourceKind], typer.Option(
        "--source", help="What PATH is (default: inferred from PATH), or a built-in renderer.",
        show_default=False)] = None,
    run: RunOpt = DEFAULT_RUN,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Shard folder to write (default: RUN/shards).", show_default=False)] = None,
    size: Annotated[Optional[int], typer.Option(
        "--size", min=8, help="Output side in pixels (§2.1: 256; default 64 for emoji/shapes).",
        show_default=False)] = None,
    image_format: Annotated[Optional[ImageFormat], typer.Option(
        "--format", help="Image encoding in the shards (default: png for emoji/shapes, jpg otherwise).",
        show_default=False)] = None,
    quality: Annotated[int, typer.Option("--quality", min=1, max=100, help="JPEG quality.")] = 95,
    min_size: Annotated[int, typer.Option(
        "--min-size", min=1, help="Reject images whose shorter side is below this many pixels.")] = 32,
    min_caption_chars: Annotated[Optional[int], typer.Option(
        "--min-caption-chars", min=1, help="Reject shorter captions (App. C; default 3, 1 for emoji/shapes).",
        show_default=False)] = None,
    max_caption_chars: Annotated[int, typer.Option(
        "--max-caption-chars", min=1, help="Reject longer captions.")] = 1000,
    val_fraction: Annotated[float, typer.Option(
        "--val-fraction", min=0.0, max=0.99, help="Share of samples held out for validation (by a hash of "
        "the key; for shapes, drawn from the renderer's val split).")] = 0.05,
    per_shard: Annotated[int, typer.Option("--per-shard", min=1, help="Samples per tar shard.")] = 1000,
    workers: Annotated[Optional[int], typer.Option(
        "--workers", min=1, help="Processes that decode, resize and encode (default: min(4, cores)). "
        "The shards do not depend on it.", show_default=False)] = None,
    dedup: Annotated[bool, typer.Option(
        "--dedup/--no-dedup", help="Drop images whose bytes repeat an earlier one (keeps the first).")] = False,
    max_error_rate: Annotated[float, typer.Option(
        "--max-error-rate", min=0.0, max=1.0, help="Stop (exit 2) when more than this share of inputs are "
        "broken: an image or caption that cannot be read or is missing, a duplicate key (judged at the end, "
        "before it from a quarter of the inputs on (at least 20, at most 1,000), and at once when the end cannot pass). Filtered samples (size, aspect ratio, caption length, duplicate images) do not count.")] = 0.5,
    image_column: Annotated[Optional[str], typer.Option(
        "--image-column", help="Manifest column with the image path or URL (default: the first of "
        "image, url, path, file, filename, image_path, img).", show_default=False)] = None,
    caption_column: Annotated[Optional[str], typer.Option(
        "--caption-column", help="Manifest column with the caption (default: the first of caption, text, "
        "txt, title, alt).", show_default=False)] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.01, help="Seconds per URL download attempt.")] = 10.0,
    retries: Annotated[int, typer.Option(
        "--retries", min=0, help="Extra attempts after a timeout, connection error, 429 or 5xx.")] = 2,
    retry_backoff: Annotated[float, typer.Option(
        "--retry-backoff", min=0.0, help="Seconds before the first retry, doubled after each.")] = 0.5,
    count: Annotated[int, typer.Option("--count", min=1, help="shapes: scenes to render (train + val).")] = 10000,
    seed: Annotated[int, typer.Option("--seed", help="shapes: the world's seed.")] = 0,
    font: Annotated[Optional[Path], typer.Option(
        "--font", help="emoji: the Noto Color Emoji font file (default: found on the system).",
        show_default=False)] = None,
    skin_tones: Annotated[bool, typer.Option("--skin-tones/--no-skin-tones", help="emoji: include skin-tone variants.")] = False,
    flags: Annotated[bool, typer.Option("--flags/--no-flags", help="emoji: include flags.")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace shards built with other arguments (default: refuse).")] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Build train/val image shards (WebDataset tars) from your images or a built-in dataset.

    Examples: `dalle build-shards photos/`, `dalle build-shards captions.csv`,
    `dalle build-shards --source shapes --count 10000`. Rerun the same command to resume.
    """
    from dallecli.commands.common import start

    start(quiet, debug)
    from dallecli.console import run_guarded

    run_guarded(build_shards, path=path, source=source.value if source else None, run=run, out=out, size=size,
                image_format=image_format.value if image_format else None, quality=quality, min_size=min_size,
                min_caption_chars=min_caption_chars, max_caption_chars=max_caption_chars,
                val_fraction=val_fraction, per_shard=per_shard, workers=workers or _default_workers(),
                dedup=dedup, max_error_rate=max_error_rate, image_column=image_column,
                caption_column=caption_column, timeout=timeout, retries=retries, retry_backoff=retry_backoff,
                count=count, seed=seed, font=font, skin_tones=skin_tones, flags=flags, overwrite=overwrite)


def build_shards(*, path: Path | None, source: str | None, run: Path, out: Path | None, size: int | None,
                 image_format: str | None, quality: int, min_size: int, min_caption_chars: int | None,
                 max_caption_chars: int, val_fraction: float, per_shard: int, workers: int, dedup: bool,
                 max_error_rate: float, image_column: str | None, caption_column: str | None, timeout: float,
                 retries: int, retry_backoff: float, count: int, seed: int, font: Path | None,
                 skin_tones: bool, flags: bool, overwrite: bool) -> dict:
    from dallecli.config import RunDir
    from dallecli.console import UserError, counted, summary, warn
    from dallecli.data.images import ImageConfig
    from dallecli.data.shards import BuildConfig, build
    from dallecli.data.fetch import FetchConfig
    from dallecli.data.listing import detect_kind
    from dallecli.data.sources import BUILTIN, PrepareConfig, SourceSpec

    if source is None:
        if path is None:
            raise UserError("give an input (a folder, a manifest or shards), or --source emoji / --source shapes")
        source = detect_kind(path)
    builtin = source in BUILTIN
    if builtin and path is not None:
        raise UserError(f"--source {source} renders its own images; drop the input path {path}")
    if not builtin and path is None:
        raise UserError(f"--source {source} needs an input path, e.g. `dalle build-shards photos/`")
    if source == "shapes" and size is not None:
        from dallecli.data.shapes import SUPPORTED_SIZES

        if size not in SUPPORTED_SIZES:  # the scenes are drawn at these sizes (shared/specs/shapes-world.md)
            raise UserError(f"--size {size}: the shapes world renders at {', '.join(map(str, SUPPORTED_SIZES))} px; "
                            "pick one of those")
    if max_caption_chars < (min_caption_chars or 1):
        raise UserError(f"--max-caption-chars {max_caption_chars} is below --min-caption-chars {min_caption_chars}")
    # Only what shapes the output of this source is recorded (and compared when resuming).
    spec = SourceSpec(kind=source, path=None if path is None else str(path.resolve()),
                      image_column=image_column if source == "manifest" else None,
                      caption_column=caption_column if source == "manifest" else None,
                      count=count if source == "shapes" else None, seed=seed if source == "shapes" else None,
                      font=None if font is None or source != "emoji" else str(font.resolve()),
                      skin_tones=skin_tones and source == "emoji", flags=flags and source == "emoji")
    from PIL import Image

    image = ImageConfig(size=size or (64 if builtin else 256), format=image_format or ("png" if builtin else "jpg"),
                        quality=quality, min_size=min_size, max_pixels=Image.MAX_IMAGE_PIXELS)
    fetch = FetchConfig(timeout=timeout, retries=retries, backoff=retry_backoff) if source == "manifest" \
        else FetchConfig()
    prepare = PrepareConfig(image=image, min_caption_chars=min_caption_chars or (1 if builtin else 3),
                            max_caption_chars=max_caption_chars, fetch=fetch, content_hash=dedup)
    config = BuildConfig(source=spec, prepare=prepare, val_fraction=val_fraction, per_shard=per_shard,
                         dedup=dedup, max_error_rate=max_error_rate)
    folder = Path(out) if out is not None else RunDir(Path(run)).shards
    try:
        manifest = build(config, folder, workers=workers, overwrite=overwrite)
    except OSError as exc:  # disk full, an unwritable folder: the complete shards stay, a rerun resumes
        if isinstance(exc, UserError):
            raise
        import errno

        blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        if exc.errno in (errno.ENOTDIR, errno.EEXIST) and blocking is not None:  # --run or --out is a file
            raise UserError(f"cannot make the shard folder {folder}: {blocking} is a file, not a folder; give "
                            "another --run or --out") from None
        raise UserError(f"cannot write the shards in {folder}: {exc.strerror or exc}; the shards already "
                        "written are intact: free space (or fix the folder) and rerun the same command") from None

    counts, shards = manifest["counts"], manifest["shards"]
    n_shards = {s: sum(1 for e in shards if e["split"] == s) for s in ("train", "val")}
    kinds = sorted(manifest["rejects"].items(), key=lambda kv: -kv[1])
    top = kinds[:4]
    more = f", +{len(kinds) - 4} more kinds (manifest.json)" if len(kinds) > 4 else ""
    rows = {
        "status": "already complete (nothing to do)" if manifest.get("already_complete") else "done",
        "inputs": counts["inputs"],
        "train": f"{counted(counts['train'], 'sample')} in {counted(n_shards['train'], 'shard')}",
        "val": f"{counted(counts['val'], 'sample')} in {counted(n_shards['val'], 'shard')}",
        "rejected": f"{counts['rejected']} ({counted(counts['errors'], 'error')})"
                    + (": " + ", ".join(f"{r} ×{n}" for r, n in top) + more if top else ""),
        "shards": folder,
        "manifest": folder / "manifest.json",
        "rejects": folder / "rejects.jsonl",
    }
    summary("build-shards", rows)
    upscaled, kept = counts.get("upscaled", 0), counts["train"] + counts["val"]
    if counts["val"] == 0 and counts["train"] and val_fraction > 0:  # a small set: the hash held none out
        larger = min(0.5, max(0.1, round(10 / kept, 2)))
        warn(f"no val samples: --val-fraction {val_fraction:g} of {counted(kept, 'image')} held none out, and "
             "train-prior's validation, train-clip and eval need held-out images; rebuild with --val-fraction "
             f"{larger:g} --overwrite")
    if upscaled and not manifest.get("already_complete"):
        from dallecli.commands.train_dvae import PRESET_FOR_SIZE

        median = manifest["upscaled_median_side"]
        fits = [s for s in PRESET_FOR_SIZE if s <= median]  # the sizes train-dvae has a preset for
        if 2 * upscaled < kept:
            advice = f"pass --min-size {image.size} to leave them out"
        elif fits:
            advice = f"pass --size {max(fits)} (a dVAE preset's size) not to upscale them"
        elif image.size > min(PRESET_FOR_SIZE):
            advice = f"pass --size {min(PRESET_FOR_SIZE)} (the smallest dVAE preset's size) to upscale them less"
        else:
            advice = (f"they are below the smallest dVAE preset's {min(PRESET_FOR_SIZE)} px, so upscaling them is "
                      f"what lets `train-dvae` use them (or pass --min-size {image.size} to leave them out)")
        warn(f"{upscaled} of {kept} kept images ({upscaled / kept:.0%}) were smaller than --size {image.size} and "
             f"were upscaled (median shorter side {median} px); {advice}")
    return manifest
