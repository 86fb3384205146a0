"""`dalle tokenize`: train the caption BPE (§2.2) on the train split's captions and save it under RUN/tokenizer."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dallecli.commands.common import DEFAULT_RUN, DebugOpt, QuietOpt, RunOpt

STATS_SAMPLE = 100_000  # captions kept (uniformly, by reservoir) for the closing statistics


def command(
    run: RunOpt = DEFAULT_RUN,
    shards: Annotated[Optional[Path], typer.Option(
        "--shards", help="Shard folder to read captions from (default: RUN/shards).")] = None,
    vocab_size: Annotated[int, typer.Option(
        "--vocab-size", min=257, help="BPE vocabulary size, special tokens included (§2.2: 16,384). "
        "A small corpus may stop short of it; the actual size is recorded.")] = 16384,
    max_len: Annotated[int, typer.Option(
        "--max-len", min=1, help="Text positions of the prior it is made for (§2.2: 256): recorded, and the statistics say how many captions are longer. The prior cuts captions at its own --text-len.")] = 256,
    min_frequency: Annotated[int, typer.Option(
        "--min-frequency", min=1, help="A pair must occur this often to become a merge.")] = 2,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace a different tokenizer even when RUN/prior was trained with it "
        "(default: refuse).")] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Train the byte-level BPE for captions and save it under RUN/tokenizer."""
    from dallecli.commands.common import start

    start(quiet, debug)
    from dallecli.console import run_guarded

    run_guarded(tokenize, run, shards, vocab_size, max_len, min_frequency, overwrite)


def tokenize(run: Path, shards: Path | None, vocab_size: int, max_len: int, min_frequency: int,
             overwrite: bool = False) -> None:
    import random

    from dallecli.checkpoint import prior_trained_with
    from dallecli.config import RunDir
    from dallecli.console import UserError, counted, info, progress, summary, warn
    from dallecli.data.records import ShardError, iter_records, list_shards
    from dallecli.text import caption_stats, train_tokenizer

    rundir = RunDir(Path(run))
    folder = Path(shards) if shards is not None else rundir.shards
    paths = list_shards(folder, "train")
    if not paths:
        raise UserError(f"no train shards (train-000000.tar …) in {folder}; make them with `dalle build-shards`")

    errors: list[ShardError] = []
    sample: list[str] = []
    rng = random.Random(0)
    counts = {"seen": 0, "no_txt": 0}

    def captions(bar):
        # One pass over the shards feeds the trainer and keeps a reservoir sample (Algorithm R) for the stats.
        for path in paths:
            n = 0
            for record in iter_records(path, errors):
                data = record.members.get("txt")
                if data is None:
                    counts["no_txt"] += 1
                    continue
                text = data.decode("utf-8", errors="replace")
                counts["seen"] += 1
                n += 1
                if len(sample) < STATS_SAMPLE:
                    sample.append(text)
                else:
                    j = rng.randrange(counts["seen"])
                    if j < STATS_SAMPLE:
                        sample[j] = text
                yield text
            bar.advance(1, rate_count=n)

    with progress("reading captions (shards)", total=len(paths), unit="caption") as bar:
        tok = train_tokenizer(captions(bar), vocab_size=vocab_size, min_frequency=min_frequency, max_len=max_len)
    for err in errors:
        warn(f"{err.shard}: {err.reason}; the rest of that shard was skipped")
    if counts["no_txt"]:
        warn(f"{counts['no_txt']} record(s) had no .txt caption and were skipped")
    if tok.vocab_size < vocab_size:
        warn(f"the corpus ran out of merges (min frequency {min_frequency}): vocabulary is {tok.vocab_size:,}, "
             f"not {vocab_size:,}")

    out = rundir.tokenizer
    old = _old_fingerprint(out)
    replaced = old is not None and old != tok.fingerprint
    # The rule of `dalle encode` for codes: never orphan the run's prior without --overwrite.
    trained = prior_trained_with(rundir.prior, "tokenizer_fingerprint", old) if replaced else None
    if trained is not None and not overwrite:
        raise UserError(f"{out} holds tokenizer {old} that the prior {trained.path} was trained with; the new one "
                        f"({tok.fingerprint}, vocabulary {tok.vocab_size}) differs and would replace it: keep the "
                        "old one (rerun with its arguments), use another --run, or pass --overwrite to replace it "
                        "(then train the prior again with --fresh)")
    tok.save(out)
    if trained is not None:
        warn(f"replaced the tokenizer in {out} (fingerprint {old} -> {tok.fingerprint}); the prior {trained.path} "
             "was trained with the old one: train it again with --fresh")
    elif replaced:
        info(f"replaced the tokenizer in {out} (fingerprint {old} -> {tok.fingerprint})")
    info(f"computing statistics on {len(sample):,} captions")
    from dallecli.models.prior import PRESETS

    cpu_len = PRESETS["small"].text_len  # the CPU presets' text length (tiny and small)
    stats = caption_stats(tok, sample, max_len, also_over=[cpu_len] if cpu_len != max_len else [])
    sampled = "" if len(sample) == counts["seen"] else f" (sample of {len(sample):,})"
    summary("tokenizer", {
        "written": f"{out / 'tokenizer.json'}, {out / 'config.json'}",
        "captions": f"{counts['seen']:,} from {counted(len(paths), 'train shard')}",
        "vocabulary": f"{tok.vocab_size:,} (asked {vocab_size:,}; pad id {tok.pad_id})",
        "vocabulary used": f"{100 * stats['vocab_used']:.1f} %{sampled}",
        "tokens per caption": f"mean {stats['tokens_mean']:.1f}, p95 {stats['tokens_p95']}, "
                              f"max {stats['tokens_max']}{sampled}",
        f"longer than {max_len}": f"{100 * stats['over_max_len']:.2f} % (cut by a prior of text length "
                                  f"{max_len}){sampled}",
        **{f"longer than {m}": f"{100 * share:.2f} % (cut by the tiny and small priors; train-prior --text-len "
                               f"sets it){sampled}" for m, share in stats["over"].items()},
        "empty captions": f"{stats['empty']:,}{sampled}",
        "fingerprint": tok.fingerprint,
    })


def _old_fingerprint(folder: Path) -> str | None:
    import json

    try:
        return json.loads((folder / "config.json").read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
