"""Stage 1 as a training task: the dVAE, its shards, its objective and its validation (§2.1, App. A)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dallecli import checkpoint
from dallecli.config import to_dict
from dallecli.console import UserError, warn
from dallecli.data.loader import BadSample, ShardIndex, make_loader, read_caption, read_image, read_meta
from dallecli.data.records import iter_records, list_shards
from dallecli.imageutil import center_square, dvae_augment, grid, to_pil, to_tensor
from dallecli.models.dvae import DVAE, PRESETS, DVAEConfig
from dallecli.models.dvae_objective import (DVAESchedule, code_histogram, codebook_perplexity, elbo_loss,
                                            map_pixels, pixel_nll, used_fraction)


def schedule_for(steps: int, beta_steps: int | None = None, tau_steps: int | None = None) -> DVAESchedule:
    """The paper's schedules (App. A.2), shortened for short runs: β warms up over 5,000 updates and τ
    anneals over 150,000 of 3M; a run of S updates uses min(paper, 10% of S) and min(paper, 50% of S)."""
    paper = DVAESchedule()
    return DVAESchedule(
        beta_steps=beta_steps if beta_steps is not None else max(1, min(paper.beta_steps, round(0.1 * steps))),
        tau_steps=tau_steps if tau_steps is not None else max(1, min(paper.tau_steps, round(0.5 * steps))),
        lr_steps=min(paper.lr_steps, steps),
    )


def shard_image_size(shards: Path, paths: list[Path] | None = None) -> int:
    """The side of the first readable image of the train shards (or of `paths`): the shards' --size. It reads
    one sample, not an index of every shard (the training task builds that once, later)."""
    paths = list_shards(shards, "train") if paths is None else paths
    if not paths:
        raise UserError(f"no train shards in {shards}; make them with `dalle build-shards`")
    for path in paths:
        for record in iter_records(path, []):
            try:
                image = read_image(record.members)
            except BadSample:
                continue
            if image.size[0] != image.size[1]:
                raise UserError(f"shard images in {shards} are not square ({image.size}); rebuild with "
                                "`dalle build-shards`")
            return image.size[0]
    raise UserError(f"the shards in {shards} hold no readable image; rebuild them with `dalle build-shards`")


def check_image_size(config: DVAEConfig, size: int, shards: Path, preset: str) -> None:
    """Shards (of `size` px) at the model's size, or larger: App. A.2's augmentation then crops and resizes each
    image at random (built at the model's size, an image only gets the random flip)."""
    if size < config.image_size:
        raise UserError(f"the images in {shards} are {size} px but the dVAE preset '{preset}' expects "
                        f"{config.image_size} px; rebuild the shards with --size {config.image_size} "
                        f"(or larger, for the paper's random crops) or choose a preset made for {size} px")


@dataclass
class DVAETask:
    config: DVAEConfig
    shards: Path
    schedule: DVAESchedule
    batch_size: int
    seed: int
    workers: int = 0
    out: Path | None = None  # where validation grids go
    val_images: int = 256
    kind: str = "dvae"
    unit: str = "img"
    # NHWC activations: 1.4–1.7× faster training of the tiny model on CPU (and the layout GPU convolutions
    # prefer). Only the memory layout changes; checkpoints store contiguous tensors.
    channels_last: bool = True

    def model_config(self) -> dict:
        return to_dict(self.config)

    def meta(self) -> dict:
        # τ and β (the learning rate follows train_config.json, not the paper's lr_* fields of the schedule)
        return {"shards": str(self.shards),
                "schedule": {k: v for k, v in to_dict(self.schedule).items() if not k.startswith("lr_")}}

    def build_model(self) -> DVAE:
        model = DVAE(self.config)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def param_groups(self, model, weight_decay):
        # App. A.2: AdamW with weight decay 1e-4 on every parameter.
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]

    def decode(self, members, rng):
        image = read_image(members)
        if min(image.size) < self.config.image_size:
            raise BadSample(f"image {image.size} is smaller than the model's {self.config.image_size} px")
        return to_tensor(dvae_augment(image, self.config.image_size, rng))

    def loader(self, start_batch, rank, world):
        index = ShardIndex(self.shards, "train")
        return make_loader(index, self.decode, torch.stack, batch_size=self.batch_size, seed=self.seed,
                           start_batch=start_batch, rank=rank, world=world, workers=self.workers)

    def count(self, batch):
        return len(batch.keys)

    def loss(self, model, x, updates):
        x = x.to(next(model.parameters()).device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return elbo_loss(model, x, self.schedule.tau(updates), self.schedule.beta(updates),
                         likelihood=self.config.likelihood, sigma=self.config.gaussian_sigma)

    def check_resume(self, ck: checkpoint.Checkpoint) -> None:
        pass

    # What the run writes beside its checkpoints (evaluation sheets) and what `dalle encode --preview` puts there
    # (`codes.preview`): --fresh removes the earlier dVAE's.
    run_files = ("recon-*.png", "preview/preview.jsonl", "preview/grid.png", "preview/[0-9][0-9][0-9]*-*.png")

    def protected_steps(self) -> dict[int, str]:
        """The checkpoints --keep must not prune (`needed_steps`)."""
        return {} if self.out is None else needed_steps(self.out)

    def summary_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """What the end-of-training summary shows of the last metrics (metrics.jsonl keeps every field as it is).
        A vq dVAE's posterior is one-hot: its "kl" is the constant log K per position, not something it learns,
        so it is left out; its bits/dim are those of a continuous (Gaussian) density, negative when the fit is
        tight, so they say so."""
        if self.config.kind != "vq":
            return metrics
        return {(f"{k} (density, can be < 0)" if k in ("bpd", "val_bpd") else k): v
                for k, v in metrics.items() if k != "kl"}

    # --- validation --------------------------------------------------------------------------------------

    def _val_set(self) -> tuple[torch.Tensor, list[str], list[dict]]:
        if not hasattr(self, "_val"):
            try:
                index = ShardIndex(self.shards, "val")
            except UserError:
                index = ShardIndex(self.shards, "train")
                if os.environ.get("RANK", "0") == "0":
                    warn(f"no val shards in {self.shards}: the val_* metrics are measured on the first "
                         f"{min(len(index), self.val_images)} train images, which the dVAE trains on (rebuild the "
                         "shards with --val-fraction above 0 for held-out ones)")
            images, captions, metas = [], [], []
            for i in range(min(len(index), self.val_images)):
                _, members = index.read(i)
                try:
                    images.append(to_tensor(center_square(read_image(members), self.config.image_size)))
                    captions.append(read_caption(members))
                    metas.append(read_meta(members))
                except BadSample:
                    continue
            self._val = (torch.stack(images), captions, metas)
        return self._val

    @torch.no_grad()
    def evaluate(self, model: DVAE, step: int) -> dict[str, float]:
        """Reconstruction MSE / PSNR of the hard (argmax) codes, the ELB in bits/dim, codebook use; for the
        shapes world also the fraction of reconstructions the shapes checker accepts; a grid PNG."""
        x, captions, metas = self._val_set()
        device = next(model.parameters()).device
        recons, nll, codes_all = [], 0.0, []
        for lo in range(0, len(x), 64):
            xb = x[lo: lo + 64].to(device)
            logits = model.encode_logits(xb)
            codes = logits.argmax(1)
            codes_all.append(codes.cpu())
            recons.append(model.decode_codes(codes).float().cpu())
            stats = _hard_stats(model, codes)
            nll += float(pixel_nll(map_pixels(xb.float()), stats, self.config.likelihood,
                                   self.config.gaussian_sigma).sum())
        recon = torch.cat(recons)
        codes = torch.cat(codes_all)
        dims = x[0].numel()
        mse = float(((recon - x) ** 2).mean())
        kl_uniform = codes[0].numel() * math.log(self.config.vocab_size)  # −ELB with a one-hot posterior
        result = {
            "val_mse": mse,
            "val_psnr": 10 * math.log10(1.0 / max(mse, 1e-12)),
            "val_bpd": (nll / len(x) + kl_uniform) / (dims * math.log(2)),
            "val_perplexity": float(codebook_perplexity(codes, self.config.vocab_size)),
            "val_used": float(used_fraction(codes, self.config.vocab_size)),
            "val_images": len(x),
        }
        result["val_loss"] = result["val_bpd"]
        if metas and all(m.get("source") == "shapes" for m in metas):
            from dallecli.evaluate.shapes_check import check

            ok = [check(to_pil(r), c)[0] for r, c in zip(recon, captions)]
            result["val_shapes_accuracy"] = sum(ok) / len(ok)
        if self.out is not None:
            n = min(16, len(x))
            sheet = grid([to_pil(t) for t in x[:n]] + [to_pil(t) for t in recon[:n]], cols=n)
            self.out.mkdir(parents=True, exist_ok=True)
            sheet.save(self.out / f"recon-{step:08d}.png")
        return result


def _hard_stats(model: DVAE, codes: torch.Tensor) -> torch.Tensor:
    """Decoder statistics (μ, ln b) for hard codes."""
    h = model.decoder.blocks.input.lookup(codes) if model.quantizer is None else model.quantizer.lookup(codes)
    return model.decoder.from_embedding(h).float()


COLLAPSED_BELOW = 0.05  # codebook perplexity, as a share of what the val set could show, under which a run is told


def collapse_warning(metrics: dict[str, float], config: DVAEConfig) -> str | None:
    """What to tell the user when the last validation found the codebook collapsed (the classic dVAE failure:
    every image encodes to the same few codes), else None. Judged by the perplexity of the val set's codes, not
    by how many codes occur at all: a collapsed gumbel dVAE still shows dozens of codes at a few positions each
    (docs/dvae-tiny-gumbel.md). The bar is 5% of the most the val set could show, min(K, positions)."""
    used, perplexity = metrics.get("val_used"), metrics.get("val_perplexity")
    if used is None or perplexity is None:
        return None
    possible = min(config.vocab_size, metrics.get("val_images", math.inf) * config.grid**2)
    if perplexity >= COLLAPSED_BELOW * possible:
        return None
    vq = next((name for name, c in PRESETS.items() if c.kind == "vq" and c.image_size == config.image_size), None)
    if config.kind == "gumbel" and vq:
        fix = (f"the paper's gumbel dVAE needs far longer runs at this size (docs/dvae-tiny-gumbel.md); the vector "
               f"quantiser learns usable codes in minutes: rerun with `--preset {vq} --fresh`")
    elif config.kind == "gumbel":
        fix = "train longer (`--steps`; the paper trains 3M updates), or start over with `--fresh` and a lower --lr"
    else:
        fix = "train longer (`--steps`), or start over with `--fresh` and a lower --lr"
    return (f"the codebook has collapsed: the val images use {round(used * config.vocab_size)} of the "
            f"{config.vocab_size} codes, nearly all of the time a few of them (perplexity {perplexity:.1f}), so "
            f"codes encoded now carry little of each image; {fix}")


def codebook_report(codes: torch.Tensor, vocab_size: int) -> dict[str, float]:
    return {"perplexity": float(codebook_perplexity(codes, vocab_size)),
            "used": float(used_fraction(codes, vocab_size)),
            "max_share": float(code_histogram(codes, vocab_size).max() / codes.numel())}


def load_dvae(path: Path, device: str | torch.device = "cpu", ema: bool = True) -> tuple[DVAE, checkpoint.Checkpoint]:
    """A trained dVAE from a checkpoint folder (EMA weights by default), in eval mode."""
    from dallecli.config import from_dict

    ck = checkpoint.load(path, "dvae")
    config = from_dict(DVAEConfig, ck.model_config, where=f"{ck.path}/config.json")
    model = DVAE(config)
    checkpoint.load_weights_into(model, ck, ema=ema)
    return model.to(device).eval(), ck


def needed_steps(out: Path) -> dict[int, str]:
    """The dVAE checkpoints in `out` that the run still needs (step → why): the one the run's codes were encoded
    with and the one its prior was trained on (sampling decodes the prior's codes with it; a later dVAE makes
    other codes). Found beside the checkpoint folder, as `dalle encode` and `train-prior` lay a run out
    (RUN/dvae, RUN/codes, RUN/prior). --keep never prunes them; --fresh refuses to replace them."""
    from dallecli.codes import read_code_manifest
    from dallecli.config import RunDir

    rd = RunDir(Path(out).parent)
    wanted: dict[str, list[str]] = {}
    try:
        wanted.setdefault(read_code_manifest(rd.codes)["dvae"]["fingerprint"], []).append(
            f"{rd.codes} were encoded with it")
    except (UserError, KeyError, TypeError):
        pass
    prior = checkpoint.latest(rd.prior)
    if prior is not None:
        try:
            fingerprint = checkpoint.load(prior, "prior").meta.get("dvae_fingerprint")
        except UserError:
            fingerprint = None
        if fingerprint:
            wanted.setdefault(fingerprint, []).append(
                f"the prior in {rd.prior} was trained on its codes and samples with it")
    steps = {}
    for fingerprint, why in wanted.items():
        folder = checkpoint.step_with_fingerprint(Path(out), fingerprint)
        if folder is not None:
            steps[int(folder.name.split("-")[1])] = "; ".join(why)
    return steps
