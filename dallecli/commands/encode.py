"""`dalle encode`: image shards → code shards with the trained dVAE (§2.1: argmax codes, no noise)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dallecli.commands.common import DEFAULT_RUN, DebugOpt, Precision, QuietOpt, RunOpt


def command(
    run: RunOpt = DEFAULT_RUN,
    dvae: Annotated[Optional[Path], typer.Option(help="dVAE checkpoint (a step folder or the folder of them; default RUN/dvae).")] = None,
    shards: Annotated[Optional[Path], typer.Option(help="Image shards (default RUN/shards).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Code shards folder (default RUN/codes).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per encoder batch.")] = 64,
    preview: Annotated[int, typer.Option(help="Instead of encoding, write N val originals and reconstructions to DVAE/preview (RUN/dvae/preview by default; 0: encode).")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the codes in OUT even when RUN/prior was trained on them (default: refuse), and encode codes of the same dVAE again instead of keeping them.")] = False,
    gpus: Annotated[int, typer.Option(help="Processes (one per GPU), each encoding its share of the shards.")] = 1,
    cpu: Annotated[bool, typer.Option("--cpu", help="Use the CPU even where a GPU is present.")] = False,
    precision: Annotated[Optional[Precision], typer.Option(help="The encoder's arithmetic: bf16 autocast (default on a GPU and on CPUs with native bf16) or fp32; the nearest-code search is fp32 either way.")] = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    from dallecli.commands.common import start

    start(quiet, debug)
    import torch

    from dallecli.codes import encode_shards, install, preview as write_preview, write_manifest
    from dallecli.config import RunDir
    from dallecli.console import UserError, summary
    from dallecli.train.launch import launched, maybe_relaunch

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
    if preview < 0:
        raise UserError(f"--preview must be a number of images, at least 1 (got {preview}); 0, the default, encodes")
    rd = RunDir(run)
    dvae, shards = dvae or rd.dvae, shards or rd.shards
    if preview:
        device = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
        # beside the dVAE's checkpoints (RUN/dvae/preview by default), where `train-dvae --fresh` clears it
        from dallecli.checkpoint import STEP_RE

        folder = dvae.parent if STEP_RE.match(dvae.name) else dvae
        write_preview(dvae, shards, folder / "preview", preview, device)
        return
    if gpus > 1 and not launched():  # the inputs, checked before launching: a bad one fails in seconds, once
        from dallecli import checkpoint
        from dallecli.codes import check_image_size, shard_jobs

        ck = checkpoint.load(dvae, "dvae")
        size = ck.model_config.get("image_size")
        paths = [p for _, p in shard_jobs(shards)]
        if isinstance(size, int):
            check_image_size(shards, paths, size, ck.path)
    maybe_relaunch(gpus, cpu=cpu)
    from accelerate import PartialState

    state = PartialState(cpu=cpu or not torch.cuda.is_available())
    out = out or rd.codes
    result = encode_shards(dvae, shards, out, batch_size=batch_size, device=state.device,
                           rank=state.process_index, world=state.num_processes,
                           precision=precision.value if precision else None, overwrite=overwrite,
                           prior=rd.prior, barrier=state.wait_for_everyone)
    state.wait_for_everyone()
    if state.is_main_process:
        manifest = write_manifest(result["work"], result["checkpoint"], result["config"], result["jobs"],
                                  result["precision"])
        if result["work"] != out:
            install(out)  # the new code set replaces OUT's only now that it is complete
        summary("encode: done", {"codes": out, "train": manifest["counts"]["train"], "val": manifest["counts"]["val"],
                                 "rejected": manifest["rejects"], "grid": f"{manifest['dvae']['grid']}²",
                                 "dvae": f"{result['checkpoint'].path} ({manifest['dvae']['fingerprint']})"})
