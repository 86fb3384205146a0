"""`dalle sample`: captions in, pictures out (§2.6)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from dallecli.commands.common import DEFAULT_RUN, DebugOpt, Precision, QuietOpt, RunOpt


def command(
    prompts: Annotated[Optional[List[str]], typer.Argument(help="Captions to draw, e.g. \"a red circle above a blue square\".", show_default=False)] = None,
    run: RunOpt = DEFAULT_RUN,
    prompts_file: Annotated[Optional[Path], typer.Option("--prompts", help="A file of captions, one per line.")] = None,
    n: Annotated[int, typer.Option("--n", help="Images drawn and written per prompt (the candidates, with --rerank).")] = 4,
    rerank: Annotated[Optional[int], typer.Option(help="Score each prompt's --n images with the contrastive model "
                                                       "(§2.6) and mark this many best ones: all --n are still "
                                                       "written; samples.jsonl gains clip_score, rank (1 = best) and "
                                                       "\"kept\" (true for the best ones); grid.png shows each prompt's "
                                                       "images best first, index.html outlines the kept ones.")] = None,
    clip: Annotated[Optional[str], typer.Option(help="Contrastive model for --rerank (default: the run's own, RUN/clip).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images decoded together.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed of the first image; image j of prompt i uses seed + i·n + j.")] = 0,
    temperature: Annotated[float, typer.Option(help="Softmax temperature (paper: 1).")] = 1.0,
    top_k: Annotated[Optional[int], typer.Option(help="Sample only among the k most likely codes.")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling: the smallest set of codes with probability ≥ p.")] = None,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale (1 = off; the prior needs --cond-drop).")] = 1.0,
    image_prompt: Annotated[Optional[Path], typer.Option(help="An image whose top rows the model completes (§2.6).")] = None,
    prompt_rows: Annotated[Optional[int], typer.Option(help="How many rows of --image-prompt's codes to keep.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Output folder name under RUN/samples (default: date and time).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (overrides RUN/samples/NAME).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing samples folder of that name (the "
                                                               "old one is kept until the new one is complete).")] = False,
    prior: Annotated[Optional[Path], typer.Option(help="Prior checkpoint (default RUN/prior, latest).")] = None,
    dvae: Annotated[Optional[Path], typer.Option(
        help="dVAE checkpoint (default: the RUN/dvae checkpoint the prior was trained with, else the latest).")] = None,
    gpus: Annotated[int, typer.Option(help="Processes (one per GPU); prompts are split between them.")] = 1,
    cpu: Annotated[bool, typer.Option("--cpu", help="Use the CPU even where a GPU is present.")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="Compile the decode step with torch.compile (on a GPU: one "
                                                           "CUDA graph per token; pays off for small batches, after "
                                                           "a start-up of about a minute).")] = False,
    precision: Annotated[Optional[Precision], typer.Option(help="bf16 or fp32 for the prior's matrix products (logits are "
                                                          "fp32 either way). Default: bf16 on a GPU and on CPUs with "
                                                          "native bf16, else fp32.")] = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    from dallecli.commands.common import start

    start(quiet, debug)
    from datetime import datetime

    from dallecli.console import UserError
    from dallecli.train.launch import launched, maybe_relaunch

    texts = list(prompts or [])
    if prompts_file is not None:
        from dallecli.config import read_utf8

        texts += [line.strip() for line in read_utf8(prompts_file, "prompts file").splitlines() if line.strip()]
    if not texts and prompts_file is not None:
        raise UserError(f"--prompts {prompts_file} holds no caption (only blank lines); write one caption per line")
    if not texts:
        raise UserError('no prompts: give captions as arguments (dalle sample "a red circle") or --prompts FILE')
    if clip is not None and rerank is None and not launched():
        from dallecli.console import warn

        warn(f"--clip {clip} is used only with --rerank K: these samples are not scored")
    if name is not None and (not name or name.startswith(".") or "/" in name or "\\" in name):
        raise UserError(f"--name {name!r} is not usable: give a plain folder name for RUN/samples/NAME (no '/', no "
                        "leading '.'), or --out FOLDER for a folder elsewhere")
    # Without --name (or --out), the launching process (or the only one) claims a new folder named by the date
    # and time just before it samples (`claim_new_folder`), and hands its name to the processes it launches.
    claimed = name is None and out is None and not launched()
    folder = out or run / "samples" / (name or datetime.now().strftime("%Y%m%d-%H%M%S"))
    if overwrite and image_prompt is not None and image_prompt.resolve().is_relative_to(folder.resolve()):
        raise UserError(f"--image-prompt {image_prompt} is inside {folder}, which --overwrite replaces; copy the "
                        "image elsewhere first, or write the samples to another folder")
    # The launching process (or the only one) sets an existing folder aside, and puts it back if sampling fails.
    from dallecli.commands.common import ReplacedFolder

    if gpus > 1 and not launched():  # checked before launching: a bad option or a missing model fails in seconds
        from dallecli import checkpoint
        from dallecli.config import RunDir
        from dallecli.sample import SamplingConfig, check_request

        check_request(texts, SamplingConfig(temperature, top_k, top_p, guidance), n=n, rerank=rerank,
                      batch_size=batch_size, image_prompt=image_prompt, prompt_rows=prompt_rows, out=folder,
                      precision=precision.value if precision else None, seed=seed)
        checkpoint.load(prior or RunDir(run).prior, "prior")
        if dvae is not None or RunDir(run).dvae.exists():  # else the dVAE its codes name (`load_pipeline`)
            checkpoint.load(dvae or RunDir(run).dvae, "dvae")
    made: list[Path] = []
    if claimed:
        from dallecli.commands.common import claim_new_folder

        name, made = claim_new_folder(run / "samples")
        folder = run / "samples" / name
        if gpus > 1:  # one folder for every process, so that the parts land together
            __import__("sys").argv += ["--name", name]
    with ReplacedFolder(folder, overwrite, active=not launched(), made=made):
        maybe_relaunch(gpus, cpu=cpu)
        import torch
        from accelerate import PartialState

        from dallecli.sample import finish_folder, merge_parts, sample_to_folder

        state = PartialState(cpu=cpu or not torch.cuda.is_available())
        scorer = None
        if rerank is not None:  # in every process before drawing (a bad --clip fails at once); reranks the merge
            from dallecli.models.clip import load_clip

            scorer = load_clip(clip, run, state.device)
        sample_to_folder(run, texts, folder, n=n, rerank=rerank, seed=seed, batch_size=batch_size, prior=prior,
                         dvae=dvae, clip=clip, temperature=temperature, top_k=top_k, top_p=top_p, guidance=guidance,
                         image_prompt=image_prompt, prompt_rows=prompt_rows, device=state.device,
                         rank=state.process_index, world=state.num_processes, compiled=compile,
                         precision=precision.value if precision else None, scorer=scorer)
        if state.num_processes > 1:
            state.wait_for_everyone()
            if state.is_main_process:
                merge_parts(folder, state.num_processes)
                finish_folder(folder, texts, n, rerank, clip, run, scorer=scorer)
