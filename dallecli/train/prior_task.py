"""Stage 2 as a training task: the transformer over caption tokens and image codes (§2.2, App. B).

It reads code shards (never pixels) and the run's tokenizer; the checkpoint records the fingerprints of
both the dVAE that made the codes and the tokenizer, and a resume or a sampler refuses any other.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dallecli import checkpoint
from dallecli.codes import read_code_manifest
from dallecli.config import to_dict
from dallecli.console import UserError, warn
from dallecli.data.loader import BadSample, ShardIndex, make_loader, read_caption, read_codes
from dallecli.models.prior import (PriorConfig, PriorTransformer, flops_per_token, param_groups, prior_loss,
                                   text_targets)
from dallecli.text import Tokenizer


@dataclass
class PriorTask:
    config: PriorConfig
    codes: Path
    tokenizer: Tokenizer
    dvae_fingerprint: str
    batch_size: int
    seed: int
    bpe_dropout: float = 0.1  # §2.2: BPE-dropout 0.1 in training
    cond_drop: float = 0.0  # caption dropout, so the sampler can use classifier-free guidance
    workers: int = 0
    val_samples: int = 512
    kind: str = "prior"
    unit: str = "tok"
    _val: tuple | None = field(default=None, repr=False)

    def model_config(self) -> dict:
        return to_dict(self.config)

    @property
    def flops_per_unit(self) -> float:
        """Training FLOPs per token (models/prior.flops_per_token), for the MFU a GPU run reports."""
        return flops_per_token(self.config)

    def meta(self) -> dict:
        return {"dvae_fingerprint": self.dvae_fingerprint, "tokenizer_fingerprint": self.tokenizer.fingerprint,
                "codes": str(self.codes), "bpe_dropout": self.bpe_dropout, "cond_drop": self.cond_drop}

    def build_model(self) -> PriorTransformer:
        return PriorTransformer(self.config)

    def param_groups(self, model, weight_decay):
        return param_groups(model, weight_decay)

    def decode(self, members, rng, train: bool = True):
        codes = read_codes(members, self.config.grid).flatten()
        if int(codes.max()) >= self.config.image_vocab:
            raise BadSample(f"code {int(codes.max())} is outside the dVAE vocabulary of {self.config.image_vocab}")
        caption = read_caption(members)
        if train and self.cond_drop and rng.random() < self.cond_drop:
            caption = ""  # an all-padding caption: the unconditional stream guidance contrasts with
        dropout = self.bpe_dropout if train else 0.0
        ids = self.tokenizer.encode(caption, dropout=dropout, rng=rng) if caption else []
        ids = ids[: self.config.text_len]
        text = torch.full((self.config.text_len,), self.config.pad_id, dtype=torch.long)
        text[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        return text, codes

    def loader(self, start_batch, rank, world):
        index = ShardIndex(self.codes, "train")
        return make_loader(index, self.decode, _stack_pairs, batch_size=self.batch_size, seed=self.seed,
                           start_batch=start_batch, rank=rank, world=world, workers=self.workers)

    def count(self, batch):
        return len(batch.keys) * self.config.seq_len

    def loss(self, model, data, updates, norm=None):
        device = next(model.parameters()).device
        text, image = (t.to(device, non_blocking=True) for t in data)
        text_logits, image_logits = model(text, image)
        return prior_loss(text_logits, image_logits, text, image, self.config.pad_id, text_norm=norm)

    def loss_norm(self, data) -> int:
        """The text loss's normaliser: with accumulation or several processes the loop sums it over the global
        batch, so that every caption token weighs alike (a micro-batch of short captions no more than others)."""
        return text_targets(data[0], self.config.pad_id)

    def check_resume(self, ck: checkpoint.Checkpoint) -> None:
        check_prior_meta(ck, self.dvae_fingerprint, self.tokenizer.fingerprint)

    @torch.no_grad()
    def evaluate(self, model, step):
        """Validation loss on the val codes, text and image separately (no dropout of any kind)."""
        if self._val is None:
            try:
                index = ShardIndex(self.codes, "val")
            except UserError:
                if not getattr(self, "_told_no_val", False) and os.environ.get("RANK", "0") == "0":
                    self._told_no_val = True
                    warn(f"no val codes in {self.codes}: validation is skipped (rebuild the shards with a larger "
                         "--val-fraction, then encode them again, for held-out val_loss)")
                return {}
            import numpy as np

            pairs = []
            for i in range(min(len(index), self.val_samples)):
                try:
                    pairs.append(self.decode(index.read(i)[1], np.random.default_rng(0), train=False))
                except BadSample:
                    continue
            if not pairs:
                return {}
            self._val = _stack_pairs(pairs)
        device = next(model.parameters()).device
        totals = {"val_loss": 0.0, "val_text_loss": 0.0, "val_image_loss": 0.0}
        n = len(self._val[0])
        for lo in range(0, n, 64):
            text, image = self._val[0][lo: lo + 64].to(device), self._val[1][lo: lo + 64].to(device)
            loss, parts = prior_loss(*model(text, image), text, image, self.config.pad_id)
            w = len(text) / n
            totals["val_loss"] += float(loss) * w
            totals["val_text_loss"] += float(parts["text_loss"]) * w
            totals["val_image_loss"] += float(parts["image_loss"]) * w
        return totals


def _stack_pairs(pairs):
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def check_prior_meta(ck: checkpoint.Checkpoint, dvae_fingerprint: str | None, tokenizer_fingerprint: str | None,
                     training: bool = True):
    """Refuse a prior trained on codes of another dVAE or with another tokenizer, naming the field. `training`:
    the fix offered includes starting the prior over (--fresh); for sampling, it names the flags to change."""
    meta = ck.meta
    if dvae_fingerprint is not None and meta.get("dvae_fingerprint") != dvae_fingerprint:
        fix = ("use the matching dVAE and codes, or --fresh to start over" if training else
               "pass the dVAE it was trained with (--dvae), or retrain the prior on this dVAE's codes "
               "(dalle encode, then dalle train-prior --fresh)")
        raise UserError(f"dvae_fingerprint mismatch: {ck.path} was trained on codes of dVAE "
                        f"{meta.get('dvae_fingerprint')}, but the dVAE here is {dvae_fingerprint}; {fix}")
    if tokenizer_fingerprint is not None and meta.get("tokenizer_fingerprint") != tokenizer_fingerprint:
        fix = ("use the run's original tokenizer, or --fresh to start over" if training else
               "restore the tokenizer it was trained with, or retrain the prior (dalle train-prior --fresh)")
        raise UserError(f"tokenizer_fingerprint mismatch: {ck.path} was trained with tokenizer "
                        f"{meta.get('tokenizer_fingerprint')}, but the tokenizer here is {tokenizer_fingerprint}; "
                        f"{fix}")


def codes_info(codes: Path) -> dict:
    """The dVAE facts a prior needs from the code manifest: fingerprint, grid, vocabulary."""
    manifest = read_code_manifest(codes)
    return manifest["dvae"]


def load_prior(path: Path, device="cpu", ema: bool = True) -> tuple[PriorTransformer, checkpoint.Checkpoint]:
    from dallecli.config import from_dict

    ck = checkpoint.load(path, "prior")
    config = from_dict(PriorConfig, ck.model_config, where=f"{ck.path}/config.json")
    model = PriorTransformer(config)
    checkpoint.load_weights_into(model, ck, ema=ema)
    return model.to(device).eval(), ck
