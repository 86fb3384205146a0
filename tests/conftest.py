"""Shared fixtures: a tiny run directory with random-weight models, made in seconds."""
import dataclasses
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CAPTIONS = [f"a {c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "cross")] + [
    "a red circle above a blue square", "a green cross to the left of a yellow circle"]


@pytest.fixture(autouse=True)
def _reset_console():
    """Every test starts with the console's defaults: a command run with --quiet by a module-scoped fixture
    (outside any test) must not silence the info lines a later test reads."""
    from dallecli.console import settings

    settings.quiet, settings.debug = False, False
    yield
    settings.quiet, settings.debug = False, False


def make_tiny_run(root, text_len=8, grid=4, vocab=32):
    """RUN/tokenizer, RUN/dvae (random tiny dVAE), RUN/prior (random tiny prior) that agree with each other."""
    from dallecli import checkpoint
    from dallecli.config import to_dict
    from dallecli.models.dvae import DVAE, DVAEConfig
    from dallecli.models.prior import PRESETS, PriorTransformer
    from dallecli.text import train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer(CAPTIONS * 3, vocab_size=300)
    tok.save(root / "tokenizer")
    dcfg = DVAEConfig(image_size=grid * 4, n_hid=8, n_blk_per_group=1, groups=3, vocab_size=vocab, n_init=8)
    dvae = DVAE(dcfg)
    dck = checkpoint.save(root / "dvae", 1, kind="dvae", model_config=to_dict(dcfg), weights=dvae.state_dict())
    fingerprint = checkpoint.load(dck, "dvae").fingerprint
    pcfg = dataclasses.replace(PRESETS["tiny"], text_vocab=tok.vocab_size, text_len=text_len, image_vocab=vocab,
                               grid=grid, d_model=32, n_layers=2, n_heads=2, pad_id=tok.pad_id)
    prior = PriorTransformer(pcfg)
    checkpoint.save(root / "prior", 1, kind="prior", model_config=to_dict(pcfg), weights=prior.state_dict(),
                    meta={"dvae_fingerprint": fingerprint, "tokenizer_fingerprint": tok.fingerprint})
    return root


@pytest.fixture
def tiny_run(tmp_path):
    return make_tiny_run(tmp_path / "run")
