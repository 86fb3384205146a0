"""`dalle convert-dvae`: OpenAI's released dVAE (encoder.pkl, decoder.pkl) → a dVAE checkpoint of ours."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dallecli.commands.common import DEFAULT_RUN, DebugOpt, QuietOpt, RunOpt


def command(
    openai: Annotated[tuple[Path, Path], typer.Option(
        "--openai", metavar="ENCODER.pkl DECODER.pkl",
        help="OpenAI's released dVAE: the encoder.pkl and decoder.pkl of the dall_e package, in that order.")],
    trust_pickle: Annotated[bool, typer.Option(
        "--trust-pickle", help="Allow unpickling the two files (pickle runs code from the file).")] = False,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Checkpoint folder to write (default: RUN/dvae).")] = None,
    run: RunOpt = DEFAULT_RUN,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Convert OpenAI's released dVAE into a dVAE checkpoint that `encode` and `sample` can use."""
    from dallecli.commands.common import start

    start(quiet, debug)
    from dallecli import checkpoint
    from dallecli.config import RunDir, to_dict
    from dallecli.console import UserError, info, summary
    from dallecli.models.dvae_convert import convert_openai, load_openai_pickle

    encoder_path, decoder_path = openai
    root = out if out is not None else RunDir(run).dvae
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {root} is a file, not a folder; give a folder for the converted checkpoint")
    if root.is_dir() and checkpoint.complete_steps(root):
        # Step 0 beside a trained dVAE would never be "latest": encode and sample would ignore it.
        raise UserError(f"{root} already holds dVAE checkpoints ({checkpoint.latest(root).name}); pass --out with "
                        "another folder for the converted one (and --dvae that folder to encode or sample)")
    if any(str(p).startswith("--") for p in openai):
        raise UserError(f"--openai takes two files, ENCODER.pkl DECODER.pkl (got {' '.join(map(str, openai))})")
    for path in openai:  # both, before saying that they are unpickled
        load_openai_pickle(path, trust_pickle, check_only=True)
    info(f"unpickling {encoder_path} and {decoder_path}")
    encoder = load_openai_pickle(encoder_path, trust_pickle)
    decoder = load_openai_pickle(decoder_path, trust_pickle)
    config, weights = convert_openai(encoder, decoder)
    meta = {"source": "openai/DALL-E release",
            "encoder_sha256": checkpoint.sha256_file(encoder_path),
            "decoder_sha256": checkpoint.sha256_file(decoder_path)}
    path = checkpoint.save(root, 0, kind="dvae", model_config=to_dict(config), weights=weights, meta=meta)
    summary("convert-dvae", {
        "checkpoint": path,
        "grid": f"{config.grid}×{config.grid} codes of {config.vocab_size} at {config.image_size} px",
        "parameters": f"{sum(v.numel() for v in weights.values()) / 1e6:.1f}M",
    })
