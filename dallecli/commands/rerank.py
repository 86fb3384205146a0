"""`dalle rerank`: score samples against their prompts with a CLIP and rank them per prompt (§2.6)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dallecli.commands.common import DEFAULT_RUN, DebugOpt, QuietOpt, RunOpt


def command(
    ctx: typer.Context,
    samples: Annotated[Optional[Path], typer.Argument(
        help="A samples.jsonl, or the sample folder holding it (default: the one drawn last under RUN/samples).",
        show_default=False)] = None,
    run: RunOpt = DEFAULT_RUN,
    images: Annotated[Optional[Path], typer.Option(
        help="Instead of a samples.jsonl: rank every image in this folder against --prompt. Writes samples.jsonl "
             "and ranked.png into FOLDER itself, or into --out; refused if either file is already there.",
        show_default=False)] = None,
    prompt: Annotated[Optional[str], typer.Option(help="The text the --images are scored against.", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="With --images: the folder for samples.jsonl (images listed relative to it) and ranked.png "
             "(default: the --images FOLDER). A samples.jsonl argument is scored in place, ranked.png beside it.",
        show_default=False)] = None,
    clip: Annotated[Optional[str], typer.Option(
        help="The CLIP: a checkpoint folder, NAME:TAG (e.g. ViT-B-32:openai, from the local cache), local-dir:FOLDER, "
             "hf-hub:ORG/REPO, or a weights file with --clip-model (default: the run's own, RUN/clip).",
        show_default=False)] = None,
    clip_model: Annotated[Optional[str], typer.Option(
        help="Architecture of a --clip weights file (e.g. dalle-tiny, ViT-B-32).", show_default=False)] = None,
    keep: Annotated[Optional[int], typer.Option(
        help="Mark the best K samples of each prompt with \"kept\": true (the paper keeps the top k of N).",
        show_default=False)] = None,
    cols: Annotated[int, typer.Option(help="Images per prompt in ranked.png (the best ones).")] = 8,
    batch_size: Annotated[int, typer.Option(help="Images per CLIP forward pass.")] = 256,
    max_missing: Annotated[float, typer.Option(
        help="Stop, writing nothing, if more than this share of the listed images is missing or unreadable.")] = 0.1,
    cpu: Annotated[bool, typer.Option("--cpu", help="Use the CPU even where a GPU is present.")] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    from dallecli.commands.common import start

    start(quiet, debug)
    import time

    import torch

    from dallecli.config import RunDir
    from dallecli.console import UserError, info, summary
    from dallecli.models.clip import load_clip
    from dallecli.rerank import check_clip_model, folder_samples, ranked_grid, rerank_samples

    for flag, value in (("--cols", cols), ("--batch-size", batch_size)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1 (got {value})")
    if not 0.0 <= max_missing <= 1.0:
        raise UserError(f"--max-missing is a share of the images, between 0 and 1 (got {max_missing})")
    check_clip_model(clip, clip_model, run)  # a --clip-model that the --clip would ignore is an error
    rows, made = None, False  # made: the --out folder did not exist before this command
    if images is not None or prompt is not None:
        if images is None or prompt is None or samples is not None:
            raise UserError("--images FOLDER and --prompt TEXT go together, without a SAMPLES argument")
        if not prompt.strip():
            raise UserError('empty --prompt: give the text to score the images against, e.g. --prompt "a red circle"')
        if images.exists() and not images.is_dir():
            raise UserError(f"--images {images} is a file; give the folder that holds the images")
        target = images if out is None else out
        if target.exists() and not target.is_dir():
            raise UserError(f"--out {target} is a file, not a folder")
        path = target / "samples.jsonl"
        if path.exists():  # not ours to replace: it may be the user's own list of these images
            again = f"rerank it with `dalle rerank {target}`, or " if out is None else ""
            raise UserError(f"{target} already has a samples.jsonl; {again}give another --out folder")
        if (target / "ranked.png").exists():  # no samples.jsonl beside it: not left by an earlier rerank
            raise UserError(f"{target} already has a ranked.png; move it away or give another --out folder")
        rows = folder_samples(images, prompt, root=target)
        made = not target.exists()
        target.mkdir(parents=True, exist_ok=True)
    elif out is not None:
        raise UserError("--out goes with --images: a samples.jsonl is scored in place (ranked.png beside it)")
    else:
        path = _samples_path(samples, RunDir(run).samples)
        owner = _run_of(path) if samples is not None and clip is None else None
        if (owner is not None and ctx.get_parameter_source("run").name == "DEFAULT"
                and owner.resolve() != Path(run).resolve()):
            run = owner  # RUN/samples/NAME without --run: that run's CLIP, not runs/default's
            info(f"reranking {path} (with the CLIP of its run, {run})")
        else:
            info(f"reranking {path}")
    device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
    scorer = load_clip(clip, run, device, model=clip_model, batch_size=batch_size)
    tic = time.perf_counter()
    try:
        rows = rerank_samples(path, scorer, keep, max_missing=max_missing, rows=rows)
    except UserError:
        if made and not any(path.parent.iterdir()):
            path.parent.rmdir()  # the --out folder made for this run: nothing was written, so it goes too
        raise
    seconds = time.perf_counter() - tic
    scored = [r for r in rows if r.get("clip_score") is not None]
    sheet = path.parent / "ranked.png"
    ranked_grid(rows, path.parent, cols=cols).save(sheet)
    if images is None and all((path.parent / f).is_file() for f in ("index.html", "grid.png")):
        # a `dalle sample` folder: its gallery, best first by the new ranks
        from dallecli.gallery import write_gallery

        write_gallery(path.parent, [r for r in rows if r.get("clip_score") is not None])
    best = {}
    for r in scored:
        if r["rank"] == 1:
            best[r["prompt"]] = r
    rows_out = {"clip": scorer.name, "samples": f"{len(scored)} scored of {len(rows)}",
                "prompts": len({r["prompt"] for r in rows}), "speed": f"{len(rows) / seconds:,.0f} img/s on {device.type}"}
    for p, r in list(best.items())[:5]:
        rows_out[f"best for '{p[:40]}'"] = f"{r['image']}  cosine {r['clip_score']:.3f}"
    if keep is not None:
        rows_out["kept"] = f"top {keep} per prompt ({sum(bool(r.get('kept')) for r in rows)} samples)"
    summary("rerank: done", {**rows_out, "scores": path, "grid": sheet})


def _run_of(path: Path) -> Path | None:
    """The run RUN of a RUN/samples/NAME/samples.jsonl (as given, or with its links followed), else None."""
    for folder in (path.absolute().parent, path.resolve().parent):
        if folder.parent.name == "samples":
            return folder.parent.parent
    return None


def _samples_path(samples: Path | None, samples_root: Path) -> Path:
    from dallecli.console import UserError

    if samples is not None:
        return samples / "samples.jsonl" if samples.is_dir() else samples
    found = sorted(samples_root.glob("*/samples.jsonl"), key=_drawn_at) if samples_root.is_dir() else []
    if not found:
        raise UserError(f"no samples under {samples_root}; make some with `dalle sample`, or pass a samples.jsonl")
    return found[-1]  # the most recently drawn sample folder


def _drawn_at(samples_jsonl: Path) -> float:
    """When a sample folder was drawn: its sampling.json's time (`dalle sample` writes it once; a rerank rewrites
    samples.jsonl, which must not make an older folder the newest), else samples.jsonl's."""
    drawn = samples_jsonl.with_name("sampling.json")
    return (drawn if drawn.is_file() else samples_jsonl).stat().st_mtime
