"""Image-set statistics (§3.1): the Gaussian blur, FID / IS / KID, the reference cache, image sets.

Features are extracted once per image and blur radius; FID, KID and IS are then computed by torchmetrics
from those features (its metrics are handed them through `_Given`, an identity "feature network"), so
our numbers are torchmetrics' numbers and a blur radius costs one pass over each set.

The feature networks (FID Inception, CLIP, a TorchScript file) are in features.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from PIL import Image, ImageFilter

from dallecli.config import usual_mode
from dallecli.console import UserError
from dallecli.data.images import upright_rgb8

KID_SUBSETS = 100      # torch-fidelity's and torchmetrics' default
KID_SUBSET_SIZE = 1000  # idem; smaller sets use half their size (a subset of all of it has no spread)
IS_SPLITS = 10          # Salimans et al. 2016


# --- the blur of §3.1 ------------------------------------------------------------------------------------

def blur(image: Image.Image, radius: float) -> Image.Image:
    """Pillow's Gaussian blur of `radius` (its σ); radius 0 returns the image untouched."""
    return image if radius == 0 else image.filter(ImageFilter.GaussianBlur(radius))


# --- FID / KID / IS through torchmetrics ----------------------------------------------------------------------

# Features are gathered across processes before the statistics (gather_rows), and only the main process
# computes them: torchmetrics must not sync its states again (that would wait on processes that never call it).
LOCAL = {"sync_on_compute": False}


class _Given(nn.Module):
    """An identity 'feature network': torchmetrics' update() is handed features we already extracted."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@contextmanager
def _quiet():
    """torchmetrics warns that KID / IS keep their features in memory: we hand it features we hold anyway."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        yield


def _enough(real: torch.Tensor, fake: torch.Tensor, what: str) -> None:
    if len(real) < 2 or len(fake) < 2:
        raise UserError(f"{what} needs at least 2 images on each side (got {len(fake)} samples, "
                        f"{len(real)} references); raise --count or generate more samples")


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to (N, D) real and (M, D) fake features (torchmetrics)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _enough(real, fake, "FID")
    with _quiet():
        metric = FrechetInceptionDistance(feature=_Given(real.shape[1]), **LOCAL)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def kid(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> tuple[float, float, int]:
    """Kernel inception distance (mean, std over subsets, subset size), cubic polynomial kernel (torchmetrics)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    _enough(real, fake, "KID")
    n = min(len(real), len(fake))
    size = KID_SUBSET_SIZE if n >= 2 * KID_SUBSET_SIZE else max(2, n // 2)
    with _quiet():
        metric = KernelInceptionDistance(feature=_Given(real.shape[1]), subsets=KID_SUBSETS, subset_size=size,
                                         **LOCAL)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), size


def inception_score(logits: torch.Tensor, seed: int = 0) -> tuple[float, float, int]:
    """exp E[KL(p(y|x) ‖ p(y))] over IS_SPLITS splits (mean, std, splits), from (N, C) logits (torchmetrics)."""
    from torchmetrics.image.inception import InceptionScore

    if len(logits) < 2:
        raise UserError(f"IS needs at least 2 images (got {len(logits)})")
    splits = min(IS_SPLITS, len(logits))
    with _quiet():
        metric = InceptionScore(feature=_Given(logits.shape[1]), splits=splits, **LOCAL)
    metric.update(logits.double())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), splits


# --- across processes ----------------------------------------------------------------------------------------

def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous slice [lo, hi) of n items that process `rank` of `world` handles."""
    return n * rank // world, n * (rank + 1) // world


def gather_rows(x: torch.Tensor, n: int, state=None) -> torch.Tensor:
    """Concatenate every process's rows (its `shard_range` of n) in rank order; one process: x itself.

    Slices may differ by one row: each is padded to the longest, gathered with accelerate, then unpadded."""
    if state is None or state.num_processes == 1:
        return x
    from accelerate.utils import gather

    world = state.num_processes
    longest = max(hi - lo for lo, hi in (shard_range(n, r, world) for r in range(world)))
    padded = x.new_zeros(longest, *x.shape[1:])
    padded[: len(x)] = x
    out = gather(padded.to(state.device)).cpu().view(world, longest, *x.shape[1:])
    return torch.cat([out[r, : hi - lo] for r, (lo, hi) in
                      enumerate(shard_range(n, r, world) for r in range(world))])


# --- the reference cache ---------------------------------------------------------------------------------------

def cache_key(**parts) -> str:
    """A stable hash of everything a cached statistic depends on (the feature fingerprint included)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def load_cached(folder: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The tensors cached under `key`, or None (a missing or unreadable entry is just recomputed)."""
    from safetensors.torch import load_file

    path = Path(folder) / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        return load_file(path)
    except Exception:  # a truncated entry: recompute it
        return None


def save_cached(folder: Path, key: str, tensors: dict[str, torch.Tensor], protocol: dict) -> Path:
    """Write tensors (safetensors, never pickle) with their protocol as metadata, atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.safetensors"
    tmp = folder / f".{key}.{os.getpid()}.tmp"
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"protocol": json.dumps(protocol, sort_keys=True, default=str)})
    usual_mode(tmp)  # safetensors makes 0600 files
    os.replace(tmp, path)
    return path


# --- image sets ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageRef:
    """Where one image's bytes are: a file, or a member of a tar at (offset, size)."""

    path: str
    offset: int = 0
    size: int = -1  # -1: the whole file

    def open(self) -> Image.Image:
        import io

        try:
            if self.size < 0:
                with Image.open(self.path) as im:
                    return upright_rgb8(im)
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.size)
            with Image.open(io.BytesIO(data)) as im:
                return upright_rgb8(im)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            where = self.path if self.size < 0 else f"{self.path} at byte {self.offset}"
            raise UserError(f"cannot read the image {where} ({exc}); regenerate or rebuild it") from None


class ImageSet(torch.utils.data.Dataset):
    """Images by index, centre-cropped and resized to `size`, then blurred by `radius`: uint8 (3, S, S)."""

    def __init__(self, refs: list[ImageRef], size: int, radius: float = 0.0):
        self.refs, self.size, self.radius = list(refs), size, radius

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> torch.Tensor:
        import numpy as np

        from dallecli.imageutil import center_square

        image = blur(center_square(self.refs[i].open(), self.size), self.radius)
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, S, S)


def over_batches(images: torch.utils.data.Dataset, fn: Callable[..., tuple], *, batch_size: int,
                 workers: int = 0, state=None, description: str = "features") -> list[torch.Tensor | None]:
    """Run `fn(x (B,3,S,S) float in [0,1], idx (B,))` → tuple of (B, …) tensors (or None) over this process's
    slice of `images`; return each output concatenated over every process, in image order."""
    from torch.utils.data import DataLoader, Subset

    from dallecli.console import progress

    n = len(images)
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    if n < world:
        raise UserError(f"{n} image(s) to share among {world} processes: lower --gpus or evaluate more images")
    lo, hi = shard_range(n, rank, world)
    loader = DataLoader(Subset(images, range(lo, hi)), batch_size=batch_size, num_workers=workers,
                        shuffle=False)
    parts: list[list[torch.Tensor | None]] = []
    with progress(description, total=hi - lo, unit="img") as bar:
        start = lo
        for x in loader:
            idx = torch.arange(start, start + len(x))
            parts.append(list(fn(x.float().div_(255), idx)))
            start += len(x)
            bar.advance(len(x))
    outs = []
    for j in range(len(parts[0]) if parts else 0):
        column = [p[j] for p in parts]
        outs.append(None if column[0] is None else gather_rows(torch.cat([c.cpu() for c in column]), n, state))
    return outs
