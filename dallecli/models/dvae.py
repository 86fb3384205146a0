"""The discrete VAE of stage 1 (§2.1, App. A): Encoder, Decoder and the bottleneck between them.

Architecture, initialisation and submodule names follow OpenAI's released `dall_e` package, so that its
weights load onto ours unchanged (`encoder.blocks.group_1.block_1.res_path.conv_1.w`, …; see
`dvae_convert.py`). Every public method takes and returns images in [0, 1]: the ε-map of the logit-Laplace
likelihood (App. A.3) is applied inside, and the decoder's statistics live in the mapped space.

Two bottlenecks share one API (`encode_logits`, `encode`, `decode_codes`, `forward`):
  gumbel  the paper's: a categorical posterior over K codes per grid cell, relaxed with gumbel-softmax in
          training; the decoder's 1×1 input conv (K → n_init) is the codebook.
  vq      an EMA vector quantiser with dead-code restarts (van den Oord et al. 2017; Razavi et al. 2019;
          Dhariwal et al. 2020): the encoder emits n_init-wide vectors, and a codebook of K such vectors
          takes the place of the decoder's input conv. An alternative for small runs, where the gumbel
          dVAE can collapse onto a few codes.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from dallecli.console import UserError
from dallecli.models.dvae_objective import gumbel_softmax, map_pixels, unmap_pixels

KINDS = ("gumbel", "vq")
LIKELIHOODS = ("logit-laplace", "gaussian")


@dataclass(frozen=True)
class DVAEConfig:
    image_size: int = 256  # §2.1: 256×256 RGB images
    channels: int = 3  # RGB
    n_hid: int = 256  # released code: width of the first group; each group doubles it (256 … 2048)
    n_blk_per_group: int = 2  # released code: 4 groups × 2 blocks = 8 layers, post_gain = 1/64
    groups: int = 4  # a ×2 pool between groups: 4 groups → 8× downsampling → a 32×32 grid at 256 px
    vocab_size: int = 8192  # §2.1: K = 8192 codes
    n_init: int = 128  # released code: width of a code's embedding, the decoder's first activation
    kind: str = "gumbel"  # "gumbel" (the paper) or "vq" (EMA vector quantiser, for small runs)
    vq_decay: float = 0.99  # vq only: EMA decay of the codebook (Razavi et al. 2019 use 0.99)
    # App. A.3: the paper's pixel likelihood is the logit-Laplace. "gaussian" (a fixed-σ Gaussian on the
    # ε-mapped pixels, i.e. the MSE of a VQ-VAE, van den Oord et al. 2017) is for the small vq presets:
    # see PRESETS for why.
    likelihood: str = "logit-laplace"
    gaussian_sigma: float = 0.07  # "gaussian" only: σ in mapped-pixel units (the weight of the squared error)
    post_gain: float | None = None  # residual-branch gain; None: the paper's 1 / n_layers² (App. A)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"dVAE kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.likelihood not in LIKELIHOODS:
            raise UserError(f"dVAE likelihood {self.likelihood!r} is not one of {', '.join(LIKELIHOODS)}")
        if not self.gaussian_sigma > 0:
            raise UserError(f"dVAE gaussian_sigma must be positive, got {self.gaussian_sigma}")
        if self.post_gain is not None and not self.post_gain > 0:
            raise UserError(f"dVAE post_gain must be positive (or null for 1/n_layers²), got {self.post_gain}")
        if min(self.image_size, self.channels, self.n_hid, self.n_blk_per_group, self.groups, self.n_init) < 1:
            raise UserError(f"dVAE config has a size below 1: {self}")
        if self.n_hid % 4:
            raise UserError(f"dVAE n_hid must be a multiple of 4 (blocks narrow to n_out/4), got {self.n_hid}")
        if self.vocab_size < 2:
            raise UserError(f"dVAE vocab_size must be at least 2, got {self.vocab_size}")
        if self.image_size % 2 ** (self.groups - 1):
            raise UserError(f"dVAE image_size {self.image_size} is not divisible by 2^(groups-1) = "
                            f"{2 ** (self.groups - 1)}")

    @property
    def grid(self) -> int:
        """Tokens per side: image_size // 2^(groups−1)."""
        return self.image_size // 2 ** (self.groups - 1)

    @property
    def n_layers(self) -> int:
        return self.groups * self.n_blk_per_group

    @property
    def residual_gain(self) -> float:
        return self.post_gain if self.post_gain is not None else 1 / self.n_layers**2


_tiny = DVAEConfig(image_size=64, n_hid=32, n_blk_per_group=1, vocab_size=512, n_init=32)
_small = DVAEConfig(image_size=128, n_hid=64, n_blk_per_group=2, vocab_size=2048, n_init=64)
PRESETS: dict[str, DVAEConfig] = {
    "paper": DVAEConfig(),  # 256 px → 32×32 × 8192 codes; encoder 53.8M, decoder 43.8M parameters
    "small": _small,  # 128 px → 16×16 × 2048 codes
    "small-vq": replace(_small, kind="vq", likelihood="gaussian"),
    "tiny": _tiny,  # 64 px → 8×8 × 512 codes; trains on two CPU cores in minutes
    "tiny-vq": replace(_tiny, kind="vq", likelihood="gaussian", gaussian_sigma=0.13, post_gain=1 / _tiny.n_layers),
}


class Conv2d(nn.Module):
    """A "same"-padded conv with the released code's parameter names (`w`, `b`) and init (App. A):
    w ~ N(0, 1/(n_in·k²)), b = 0. `fp32=True` runs it outside autocast (code logits, code embeddings)."""

    def __init__(self, n_in: int, n_out: int, kw: int, fp32: bool = False):
        super().__init__()
        self.kw, self.fp32 = kw, fp32
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw * kw))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp32:
            return F.conv2d(x, self.w, self.b, padding=self.kw // 2)
        if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self.forward(x)
        return F.conv2d(x.float(), self.w.float(), self.b.float(), padding=self.kw // 2)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """This 1×1 conv applied to one_hot(codes), as a table lookup: (B, h, w) → (B, n_out, h, w)."""
        table = self.w[:, :, 0, 0].t().float()  # (n_in, n_out)
        return (F.embedding(codes, table) + self.b.float()).permute(0, 3, 1, 2)


class ResBlock(nn.Module):
    """Pre-activation bottleneck block (App. A): id_path(x) + post_gain · res_path(x), where res_path is
    four ReLU→conv pairs narrowing to n_out/4 inside; the encoder's kernels are 3,3,3,1, the decoder's 1,3,3,3.
    App. A: post_gain = 1 / n_layers², a small residual gain that keeps early training stable."""

    def __init__(self, n_in: int, n_out: int, post_gain: float, kernels: tuple[int, int, int, int]):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = post_gain
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        layers = []
        for i, kw in enumerate(kernels):
            # The first ReLU's input is also the id path's; the others act on a conv's output, which the conv's
            # backward does not keep, so they may overwrite it.
            layers += [(f"relu_{i + 1}", nn.ReLU(inplace=i > 0)),
                       (f"conv_{i + 1}", Conv2d(widths[i], widths[i + 1], kw))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor, upsample: bool = False) -> torch.Tensor:
        """The block on x, or with `upsample` on x's ×2 nearest upsampling (the decoder's, between groups).

        The layers before each path's first spatial conv are pointwise there (ReLU, 1×1 conv, ReLU), and
        pointwise layers commute with nearest upsampling: they run on x at the low resolution and only their
        outputs are upsampled, the same values for a quarter of the work in those layers. The gain multiplies
        the last conv's weights rather than its output (one pass over the activations fewer, forward and
        backward)."""
        res = self.res_path
        if upsample:
            if res.conv_1.kw != 1:
                raise ValueError("a block can take the upsampling over only where its first conv is 1×1")
            identity = _upsample(self.id_path(x))
            h = res[3:-1](_upsample(res.relu_2(res.conv_1(res.relu_1(x)))))
        else:
            identity = self.id_path(x)
            h = res[:-1](x)
        last = res[-1]
        out = F.conv2d(h, last.w * self.post_gain, last.b * self.post_gain, padding=last.kw // 2)
        if out.dtype != identity.dtype:  # e.g. an fp32 input under autocast: the sum is fp32, as before
            return identity + out
        return out.add_(identity)  # in place: neither the conv's backward nor the sum's needs `out`


def _upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def _group(n_in: int, width: int, config: DVAEConfig, kernels, resample: tuple[str, nn.Module] | None):
    blocks = [(f"block_{i + 1}", ResBlock(n_in if i == 0 else width, width, config.residual_gain, kernels))
              for i in range(config.n_blk_per_group)]
    return nn.Sequential(OrderedDict(blocks + ([resample] if resample else [])))


class Encoder(nn.Module):
    """(B, C, H, W) mapped pixels → (B, K, h, w) code logits (gumbel) or (B, n_init, h, w) vectors (vq)."""

    def __init__(self, config: DVAEConfig):
        super().__init__()
        widths = [config.n_hid * 2**g for g in range(config.groups)]  # 1·, 2·, 4·, 8·n_hid
        layers = [("input", Conv2d(config.channels, widths[0], 7))]
        n_in = widths[0]
        for g, width in enumerate(widths):
            # App. A: max-pooling (after every group but the last) worked better than average pooling
            pool = ("pool", nn.MaxPool2d(kernel_size=2)) if g < config.groups - 1 else None
            layers.append((f"group_{g + 1}", _group(n_in, width, config, (3, 3, 3, 1), pool)))
            n_in = width
        n_out = config.vocab_size if config.kind == "gumbel" else config.n_init
        conv = Conv2d(n_in, n_out, 1, fp32=True)  # released code: the code logits stay in fp32
        # in place: its input is the last block's sum, used by nothing else
        layers.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU(inplace=True)), ("conv", conv)]))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Decoder(nn.Module):
    """(B, K, h, w) (soft) one-hot codes (gumbel) or (B, n_init, h, w) code vectors (vq) → (B, 2C, H, W)
    statistics of the logit-Laplace likelihood: channels [0, C) are μ, [C, 2C) are ln b (App. A.3)."""

    def __init__(self, config: DVAEConfig):
        super().__init__()
        widths = [config.n_hid * 2**g for g in reversed(range(config.groups))]  # 8·, 4·, 2·, 1·n_hid
        # The 1×1 conv from K one-hot channels is the gumbel codebook (kept in fp32); a vq model's
        # codebook lives in its quantiser instead.
        first = Conv2d(config.vocab_size, config.n_init, 1, fp32=True) if config.kind == "gumbel" else nn.Identity()
        layers = [("input", first)]
        n_in = config.n_init
        for g, width in enumerate(widths):
            up = ("upsample", nn.Upsample(scale_factor=2, mode="nearest")) if g < config.groups - 1 else None
            layers.append((f"group_{g + 1}", _group(n_in, width, config, (1, 3, 3, 3), up)))
            n_in = width
        conv = Conv2d(n_in, 2 * config.channels, 1)
        # in place: its input is the last block's sum, used by nothing else
        layers.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU(inplace=True)), ("conv", conv)]))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.from_embedding(self.blocks.input(z))

    def from_embedding(self, h: torch.Tensor) -> torch.Tensor:
        """Everything after the input layer: (B, n_init, h, w) code embeddings → (B, 2C, H, W).
        Each group's closing upsample is handed to the next group's first block (`ResBlock.forward`)."""
        upsample = False
        for name, group in self.blocks.named_children():
            if not name.startswith("group_"):
                continue
            for layer in group:
                if isinstance(layer, ResBlock):
                    h, upsample = layer(h, upsample=upsample), False
                else:  # the group's nn.Upsample (×2 nearest), done by the next block
                    upsample = True
        return self.blocks.output(_upsample(h) if upsample else h)


class VectorQuantizer(nn.Module):
    """EMA vector quantiser with dead-code restarts.

    The codebook is not trained by gradient: each code is the (Laplace-smoothed) exponential moving average
    of the encoder outputs assigned to it (Razavi et al. 2019). A code whose moving-average use falls below
    `restart_below` vectors per step is restarted at a random encoder output of the batch (Dhariwal et al.
    2020); since use starts at zero, the first training step initialises the whole codebook from data.
    The averages update in training-mode forward passes, like BatchNorm statistics (so a forward that is
    re-run, as by activation checkpointing, updates them twice). Under DDP the default broadcast_buffers=True
    gives every rank rank 0's codebook at each step.
    """

    def __init__(self, vocab_size: int, dim: int, decay: float = 0.99, restart_below: float = 1.0):
        super().__init__()
        self.decay, self.restart_below, self.eps = decay, restart_below, 1e-5
        self.register_buffer("codebook", torch.randn(vocab_size, dim))  # (K, D)
        self.register_buffer("cluster_size", torch.zeros(vocab_size))  # EMA of vectors assigned per step
        self.register_buffer("code_sum", torch.zeros(vocab_size, dim))  # EMA of their sum

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """−‖h − e_k‖², the vq counterpart of code logits: (B, D, h, w) → (B, K, h, w); argmax = nearest code.
        In fp32 under autocast too: with the h·e products in bf16, 70% of a trained tiny-vq's codes moved to
        another, nearly as near code (the reconstructions lost 0.1 dB)."""
        with torch.autocast(h.device.type, enabled=False):
            flat = h.float().permute(0, 2, 3, 1)  # (B, h, w, D)
            e = self.codebook.float()
            dist = flat.pow(2).sum(-1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(-1)  # (B, h, w, K)
        return -dist.permute(0, 3, 1, 2)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codes → (B, D, h, w) code vectors."""
        return F.embedding(codes, self.codebook).permute(0, 3, 1, 2)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantise (B, D, h, w) → (straight-through vectors, scores, commitment ‖h − sg(e)‖² per element)."""
        logits = self.scores(h)
        codes = logits.argmax(1)  # (B, h, w)
        q = self.lookup(codes)
        commitment = F.mse_loss(h.float(), q)
        if self.training:
            self._update(h.detach().float(), codes)
        return h + (q - h).detach(), logits, commitment  # straight-through: the decoder's gradient reaches h

    @torch.no_grad()
    def _update(self, h: torch.Tensor, codes: torch.Tensor) -> None:
        flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])  # (N, D)
        idx = codes.reshape(-1)
        counts = torch.bincount(idx, minlength=len(self.codebook)).float()
        sums = torch.zeros_like(self.code_sum).index_add_(0, idx, flat)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.code_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + len(self.codebook) * self.eps) * n
        self.codebook.copy_(self.code_sum / smoothed.unsqueeze(1))
        dead = self.cluster_size < self.restart_below
        if dead.any():
            picks = flat[torch.randint(len(flat), (int(dead.sum()),), device=flat.device)]
            self.codebook[dead] = picks
            self.code_sum[dead] = picks * self.restart_below
            self.cluster_size[dead] = self.restart_below


class DVAEOutput(NamedTuple):
    stats: torch.Tensor  # (B, 2C, H, W) decoder output: μ, ln b of the mapped pixels
    logits: torch.Tensor  # (B, K, h, w) fp32: code logits (gumbel) or −squared distances (vq)
    commitment: torch.Tensor | None  # vq: ‖z − sg(e)‖² per element; gumbel: None


class DVAE(nn.Module):
    """Encoder + bottleneck + decoder. Images in [0, 1], shape (B, C, H, W); codes (B, grid, grid) int64."""

    def __init__(self, config: DVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantizer = VectorQuantizer(config.vocab_size, config.n_init, config.vq_decay) \
            if config.kind == "vq" else None

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.config.channels:
            raise ValueError(f"expected images of shape (B, {self.config.channels}, H, W) in [0, 1], "
                             f"got {tuple(x.shape)}")

    def encode_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images in [0, 1] (the ε-map is applied here) → (B, K, grid, grid) fp32 scores."""
        self._check(x)
        h = self.encoder(map_pixels(x))
        return h if self.quantizer is None else self.quantizer.scores(h)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """§2.1: the stage-2 tokens are the argmax of the logits (no noise): (B, grid, grid) int64, row-major."""
        return self.encode_logits(x).argmax(1)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, grid, grid) codes → (B, C, H, W) images in [0, 1]: sigmoid(μ), undo the ε-map, clamp (App. A.3)."""
        if self.quantizer is None:
            h = self.decoder.blocks.input.lookup(codes)  # = the input conv on one_hot(codes), without the one-hot
        else:
            h = self.quantizer.lookup(codes)
        stats = self.decoder.from_embedding(h)
        return unmap_pixels(torch.sigmoid(stats[:, : self.config.channels].float()))

    def forward(self, x: torch.Tensor, tau: float, hard: bool = False) -> DVAEOutput:
        """One training pass on images in [0, 1]: the decoder's statistics for the relaxed sample at
        temperature τ (gumbel; `hard` = straight-through one-hot) or for the quantised vectors (vq; τ unused),
        with the noise-free logits the objective needs (returned here so that wrappers like DDP see one call)."""
        self._check(x)
        h = self.encoder(map_pixels(x))
        if self.quantizer is None:
            return DVAEOutput(self.decoder(gumbel_softmax(h, tau, hard)), h, None)
        q, logits, commitment = self.quantizer(h)
        return DVAEOutput(self.decoder(q), logits, commitment)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
