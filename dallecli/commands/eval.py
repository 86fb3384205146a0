"""`dalle eval`: FID / IS / KID under Gaussian blur (§3.1), CLIP score, composition, dVAE reconstruction."""
from __future__ import annotations

import dataclasses
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer

from dallecli.commands.common import DEFAULT_RUN, DebugOpt, QuietOpt, ReplacedFolder, RunOpt, claim_new_folder


def _numbers(text: str, flag: str, example: str, cast=float) -> tuple:
    from dallecli.console import UserError

    try:
        return tuple(cast(v) for v in text.split(",") if v.strip())
    except ValueError:
        kind = "whole numbers" if cast is int else "numbers"
        raise UserError(f"{flag} takes comma-separated {kind} (e.g. {flag} {example}), got {text!r}") from None


def _within(path: Path, folder: Path) -> bool:
    """Whether `path` (as given, or with its links followed) lies inside `folder`."""
    return any(f in (p, *p.parents) for p in (path.absolute(), path.resolve())
               for f in (folder.absolute(), folder.resolve()))


def command(
    run: RunOpt = DEFAULT_RUN,
    name: Annotated[Optional[str], typer.Option(
        help="Output folder RUN/eval/NAME (default: date and time). An existing one is refused unless "
             "--overwrite.")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an existing RUN/eval/NAME, once this evaluation succeeds (it is kept if this "
                            "one fails).")] = False,
    count: Annotated[Optional[int], typer.Option(help="Captions to generate for, and real val images to compare with "
                                                      "(default 1000).", show_default=False)] = None,
    captions: Annotated[Optional[Path], typer.Option(help="Prompts from this file (one per line) instead of the val captions.")] = None,
    samples: Annotated[Optional[Path], typer.Option(help="Evaluate this samples.jsonl (or the one in this folder) instead of generating.")] = None,
    composition_samples: Annotated[Optional[Path], typer.Option(help="Shapes world: samples.jsonl of test-split captions for the composition table.")] = None,
    blur: Annotated[str, typer.Option(help="Gaussian blur radii applied to both sets (§3.1).")] = "0,1,2,4,8",
    features: Annotated[str, typer.Option(help="Feature network: inception, clip, or a TorchScript file (.pt).")] = "inception",
    inception_weights: Annotated[Optional[Path], typer.Option(help="pt_inception-2015-12-05-6726825d.pth (default: the torch hub cache).")] = None,
    clip: Annotated[Optional[str], typer.Option(help="CLIP for CLIP scores and reranking: a name, file or folder (default: RUN/clip).")] = None,
    rerank: Annotated[Optional[int], typer.Option(help="Headline metrics on the best of K candidates per caption (CLIP reranking).")] = None,
    rerank_sizes: Annotated[Optional[str], typer.Option(help="Metrics against the number of candidates reranked, e.g. 1,2,4,8 (Fig. 9c).")] = None,
    composition_count: Annotated[int, typer.Option(
        help="Shapes world: captions rendered from each test split. The composition table counts these and the "
             "main evaluation's shapes captions (--count). Only for shards of the shapes world; 0 turns it off.")] = 200,
    size: Annotated[Optional[int], typer.Option(help="Compare at this side (default: the smaller of samples and references).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch (generation and features).")] = 32,
    workers: Annotated[int, typer.Option(help="Image decoding processes per GPU.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of generation and of the KID / IS subsets.")] = 0,
    max_missing: Annotated[float, typer.Option(help="Stop when more than this share of listed sample images is missing or unreadable.")] = 0.05,
    shards: Annotated[Optional[Path], typer.Option(help="Image shards holding the val split (default RUN/shards).")] = None,
    prior: Annotated[Optional[Path], typer.Option(help="Transformer checkpoint (default RUN/prior).")] = None,
    dvae: Annotated[Optional[Path], typer.Option(help="dVAE checkpoint (default RUN/dvae).")] = None,
    no_reconstruction: Annotated[bool, typer.Option("--no-reconstruction", help="Skip the dVAE reconstruction metrics.")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    top_k: Annotated[Optional[int], typer.Option(help="Sample from the k most likely codes.")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling threshold.")] = None,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale (1 = none).")] = 1.0,
    gpus: Annotated[int, typer.Option(help="Processes (one per GPU) splitting generation and feature extraction.")] = 1,
    cpu: Annotated[bool, typer.Option("--cpu", help="Use the CPU even where a GPU is present.")] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    from dallecli.commands.common import start

    start(quiet, debug)
    import torch

    from dallecli.config import RunDir
    from dallecli.console import UserError, summary
    from dallecli.evaluate.report import PLOTS, print_tables
    from dallecli.evaluate.run import EvalConfig, evaluate
    from dallecli.train.launch import launched, maybe_relaunch

    # A sample folder stands for the samples.jsonl in it (as `dalle rerank FOLDER` takes it)
    samples, composition_samples = (p / "samples.jsonl" if p is not None and (p / "samples.jsonl").is_file() else p
                                    for p in (samples, composition_samples))
    if samples is not None and not launched():
        unused = [flag for flag, given in (("--captions", captions is not None), ("--prior", prior is not None),
                                           ("--temperature", temperature != 1.0), ("--top-k", top_k is not None),
                                           ("--top-p", top_p is not None), ("--guidance", guidance != 1.0)) if given]
        if unused:
            from dallecli.console import warn

            warn(f"{', '.join(unused)} only shape the samples eval draws itself; with --samples they are not used")
    given_name = name
    name = datetime.now().strftime("%Y%m%d-%H%M%S") if name is None else name
    cfg = EvalConfig(name=name, count=count, captions=captions, samples=samples,
                     composition_samples=composition_samples, blur=_numbers(blur, "--blur", "0,1,2,4,8"),
                     features=features, inception_weights=inception_weights, clip=clip, rerank=rerank,
                     rerank_sizes=_numbers(rerank_sizes, "--rerank-sizes", "1,2,4,8", int) if rerank_sizes else (),
                     composition_count=composition_count, size=size, batch_size=batch_size, workers=workers,
                     seed=seed, max_missing=max_missing, shards=shards, prior=prior, dvae=dvae,
                     reconstruction=not no_reconstruction, temperature=temperature, top_k=top_k, top_p=top_p,
                     guidance=guidance)
    cfg.validate()
    # The launching process (or the only one) sets an earlier evaluation of that name aside and puts it back if
    # this one fails: a failure mid-way leaves no new samples beside old metrics. Where an input (samples,
    # captions, a network) lies inside that folder, it stays where it is (metrics.json is replaced whole, at
    # the end).
    claimed = given_name is None and not launched()  # a new folder of the date and time, made just below
    folder = RunDir(run).eval / name
    inputs = (samples, composition_samples, captions, features, inception_weights, clip, shards, prior, dvae)
    inside = any(p is not None and _within(Path(p), folder) for p in inputs)
    if inside and not overwrite and not launched() and (folder / "metrics.json").exists():
        raise UserError(f"evaluation folder {folder} already exists; choose another --name, or pass --overwrite to "
                        "replace its results")
    made: list[Path] = []
    if claimed:  # (`claim_new_folder`: two evaluations started in the same second get two folders)
        name, made = claim_new_folder(RunDir(run).eval)
        cfg = dataclasses.replace(cfg, name=name)
        folder = RunDir(run).eval / name
        if gpus > 1:  # one folder for every process
            sys.argv += ["--name", name]
    with ReplacedFolder(folder, overwrite=overwrite, active=not launched() and not inside, what="evaluation",
                        flags="--name", markers=("metrics.json", "samples.jsonl", "samples"), made=made):
        maybe_relaunch(gpus, cpu=cpu)  # --gpus N: N copies of this command under accelerate, each a rank
        from accelerate import PartialState

        result = evaluate(run, cfg, PartialState(cpu=cpu or not torch.cuda.is_available()))
    if result is None:  # not the main process
        return
    folder, metrics = result
    print_tables(metrics)
    plots = [str(folder / p) for p in PLOTS.values() if (folder / p).exists()]
    summary("eval: done", {"metrics": folder / "metrics.json", "plots": ", ".join(plots),
                           "samples": metrics["protocol"]["samples"]})

