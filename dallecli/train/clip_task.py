"""The reranker's contrastive model as a training task: open_clip's CLIP on the run's image shards (§2.6).

The model is open_clip's own (built from a shipped or open_clip architecture), its loss is open_clip's
`ClipLoss` (symmetric cross-entropy over the batch's image–text similarities, gathered across processes),
and its validation reports image→text retrieval on the val split: for each image, is its caption among
the k most similar captions? Identical captions (the shapes world repeats "a red circle") are one candidate,
so a hit on any copy of the right text counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dallecli import checkpoint
from dallecli.console import UserError
from dallecli.data.loader import BadSample, ShardIndex, make_loader, read_caption, read_image
from dallecli.models.clip import model_from_config, preprocess, tokenizer_for

MAX_LOGIT_SCALE = math.log(100)  # open_clip clamps the learned temperature to 100 (CLIP, Radford et al. §2.5)


def no_decay(name: str, p: torch.Tensor) -> bool:
    """open_clip's rule: no weight decay on gains, biases, norms and the temperature."""
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def crop_augment(image: Image.Image, rng: np.random.Generator, min_side: float = 0.9) -> Image.Image:
    """A random square crop of 90–100% of the side. No flips: captions say "to the left of"."""
    w, h = image.size
    s = min(w, h)
    t = int(rng.integers(round(min_side * s), s + 1))
    x0, y0 = int(rng.integers(0, w - t + 1)), int(rng.integers(0, h - t + 1))
    return image.crop((x0, y0, x0 + t, y0 + t))


@dataclass
class ClipTask:
    name: str  # the architecture's name (shipped or open_clip's); the config below is what counts
    model_cfg: dict[str, Any]  # open_clip's: embed_dim, vision_cfg, text_cfg
    preprocess_cfg: dict[str, Any]  # size, mean, std, …: the same for training, validation and scoring
    shards: Path
    batch_size: int
    seed: int
    workers: int = 0
    augment: bool = True
    val_images: int = 1000
    kind: str = "clip"
    unit: str = "img"
    _loss_fn: Any = field(default=None, repr=False)

    def __post_init__(self):
        self.tokenizer = tokenizer_for(self.model_cfg)

    def model_config(self) -> dict[str, Any]:
        # Everything needed to rebuild the model and its inputs; also what open_clip_config.json holds.
        return {"name": self.name, "model_cfg": self.model_cfg, "preprocess_cfg": self.preprocess_cfg}

    def meta(self) -> dict[str, Any]:
        return {"shards": str(self.shards)}

    def extra_json(self) -> dict[str, Any]:
        """In every checkpoint folder, from its save on (a killed run's included): open_clip loads it as is."""
        from dallecli.models.clip import OPEN_CLIP_CONFIG, open_clip_config

        return {OPEN_CLIP_CONFIG: open_clip_config(self.model_config())}

    def build_model(self) -> torch.nn.Module:
        return model_from_config(self.model_cfg)

    def param_groups(self, model, weight_decay):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [{"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
                {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": weight_decay}]

    # --- data -------------------------------------------------------------------------------------------

    def decode(self, members, rng):
        image = read_image(members)
        caption = read_caption(members)
        if self.augment:
            image = crop_augment(image, rng)
        return preprocess(image, self.preprocess_cfg), self.tokenizer([caption])[0]

    @staticmethod
    def collate(samples):
        images, tokens = zip(*samples)
        return torch.stack(images), torch.stack(tokens)  # (B, 3, S, S), (B, context)

    def loader(self, start_batch, rank, world):
        index = ShardIndex(self.shards, "train")
        return make_loader(index, self.decode, self.collate, batch_size=self.batch_size, seed=self.seed,
                           start_batch=start_batch, rank=rank, world=world, workers=self.workers)

    def count(self, batch):
        return len(batch.keys)

    # --- objective --------------------------------------------------------------------------------------

    def clip_loss(self):
        if self._loss_fn is None:
            from open_clip.loss import ClipLoss

            dist = torch.distributed
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            rank = dist.get_rank() if world > 1 else 0
            # Across processes every image is contrasted with every process's texts (gathered with grad).
            self._loss_fn = ClipLoss(local_loss=world > 1, gather_with_grad=world > 1, cache_labels=True,
                                     rank=rank, world_size=world)
        return self._loss_fn

    def loss(self, model, data, updates):
        images, tokens = data
        device = next(model.parameters()).device
        out = model(images.to(device, non_blocking=True), tokens.to(device, non_blocking=True))
        image_features, text_features, scale = out[:3]
        # The temperature is clamped at 100 in the forward pass (open_clip clamps the parameter after each step).
        scale = scale.clamp(max=math.exp(MAX_LOGIT_SCALE))
        loss = self.clip_loss()(image_features, text_features, scale)
        return loss, {"logit_scale": float(scale.detach())}

    def check_resume(self, ck: checkpoint.Checkpoint) -> None:
        pass

    # --- validation -------------------------------------------------------------------------------------

    def _val_set(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        if not hasattr(self, "_val"):
            try:
                index = ShardIndex(self.shards, "val")
            except UserError:
                raise UserError(f"no val shards in {self.shards}: retrieval accuracy needs held-out images; "
                                "rebuild them with a larger --val-fraction (`dalle build-shards --val-fraction 0.1 "
                                "--overwrite`), or pass --eval-every 0") from None
            images, captions = [], []
            for i in range(min(len(index), self.val_images)):
                _, members = index.read(i)
                try:
                    images.append(preprocess(read_image(members), self.preprocess_cfg))
                    captions.append(read_caption(members))
                except BadSample:
                    continue
            if not images:
                raise UserError(f"the val shards in {self.shards} hold no readable image–caption pairs")
            self._val = (torch.stack(images), self.tokenizer(captions), captions)
        return self._val

    @torch.no_grad()
    def evaluate(self, model, step: int) -> dict[str, float]:
        """val_loss (ClipLoss over batches of --batch-size) and image→text top-1 / top-5 retrieval accuracy of
        the val_images images among the val split's val_candidates distinct captions (fewer than the images
        where two images share a caption: either image finding that caption is a hit)."""
        from open_clip.loss import ClipLoss

        images, tokens, captions = self._val_set()
        device = next(model.parameters()).device
        img, txt = [], []
        for lo in range(0, len(images), 256):
            img.append(model.encode_image(images[lo: lo + 256].to(device), normalize=True).float())
            txt.append(model.encode_text(tokens[lo: lo + 256].to(device), normalize=True).float())
        img, txt = torch.cat(img), torch.cat(txt)  # (N, D) each
        scale = model.logit_scale.exp().clamp(max=math.exp(MAX_LOGIT_SCALE)).float()
        # The loss over full batches of the training batch size, so that it reads like the training loss.
        bs, loss_fn = min(self.batch_size, len(img)), ClipLoss()
        losses = [float(loss_fn(img[lo: lo + bs], txt[lo: lo + bs], scale)) for lo in range(0, len(img) - bs + 1, bs)]
        # Distinct captions are the candidates; each image's target is its own caption's row.
        unique = list(dict.fromkeys(captions))
        row = {c: i for i, c in enumerate(unique)}
        first = [captions.index(c) for c in unique]
        target = torch.tensor([row[c] for c in captions], device=device)
        sims = img @ txt[first].T  # (N, U) cosines
        k = min(5, len(unique))
        top = sims.topk(k, dim=1).indices  # (N, k)
        hits = top == target[:, None]
        return {"val_loss": sum(losses) / len(losses),
                "val_top1": float(hits[:, 0].float().mean()),
                "val_top5": float(hits.any(dim=1).float().mean()),
                "val_candidates": float(len(unique)), "val_images": float(len(captions))}
