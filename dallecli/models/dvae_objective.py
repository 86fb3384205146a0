"""The dVAE's objective (§2.1, App. A): pixel map, logit-Laplace likelihood, relaxation, ELB, schedules, metrics.

Everything here is a pure function of tensors (or of the model's forward output); the training loop calls
`elbo_loss(model, x, tau, beta)` and reads τ, β and the learning rate from `DVAESchedule`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOGIT_LAPLACE_EPS = 0.1  # App. A.3: pixels live in (ε, 1−ε) so that logit(x) stays finite


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """[0, 1] → [ε, 1−ε] (App. A.3): x' = (1 − 2ε)·x + ε."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """The inverse of `map_pixels`, clamped to [0, 1]."""
    return ((x - eps) / (1 - 2 * eps)).clamp(0, 1)


def logit_laplace_nll(x: torch.Tensor, mu: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """−ln f(x | μ, b) elementwise, for mapped pixels x in (0, 1) (App. A.3):

        f(x | μ, b) = 1 / (2b·x(1−x)) · exp(−|logit(x) − μ| / b)

    The Laplace density of logit(x), carried back to (0, 1) by the change of variables x = sigmoid(y).
    """
    return math.log(2.0) + log_b + torch.log(x) + torch.log1p(-x) + (torch.logit(x) - mu).abs() * torch.exp(-log_b)


def gaussian_nll(x: torch.Tensor, mu: torch.Tensor, sigma: float) -> torch.Tensor:
    """−ln N(x | sigmoid(μ), σ²) elementwise, for mapped pixels x: the squared error of a VQ-VAE (van den Oord
    et al. 2017) as a likelihood. The decoder's μ channels give the mean through the same sigmoid as the
    logit-Laplace's reconstruction; its ln b channels are unused."""
    return 0.5 * ((x - torch.sigmoid(mu)) / sigma) ** 2 + math.log(sigma) + 0.5 * math.log(2 * math.pi)


def pixel_nll(x: torch.Tensor, stats: torch.Tensor, likelihood: str = "logit-laplace",
              sigma: float = 0.07) -> torch.Tensor:
    """−ln p(x | decoder statistics) elementwise: mapped pixels x (B, C, H, W), stats (B, 2C, H, W) = μ, ln b."""
    c = x.shape[1]
    mu, log_b = stats[:, :c], stats[:, c:]
    if likelihood == "logit-laplace":
        return logit_laplace_nll(x, mu, log_b)
    if likelihood == "gaussian":
        return gaussian_nll(x, mu, sigma)
    raise ValueError(f"unknown likelihood {likelihood!r}")


def gumbel_softmax(logits: torch.Tensor, tau: float, hard: bool = False, dim: int = 1) -> torch.Tensor:
    """The gumbel-softmax relaxation (§2.1): softmax((logits + Gumbel noise) / τ) along `dim`.

    `hard=True` returns the one-hot of the sample in the forward pass and the relaxed gradient in the
    backward pass (straight-through); the paper trains with the soft sample in both.
    """
    u = torch.rand_like(logits, dtype=torch.float32).clamp_(min=torch.finfo(torch.float32).tiny)
    gumbels = -torch.log(-torch.log(u))  # u < 1 always, so −log(u) > 0
    y = F.softmax((logits.float() + gumbels) / tau, dim=dim)
    if not hard:
        return y
    one_hot = torch.zeros_like(y).scatter_(dim, y.argmax(dim, keepdim=True), 1.0)
    return one_hot - y.detach() + y


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(q ‖ uniform) in nats per image, summed over grid positions: (B, K, h, w) → (B,).

    §2.1: computed from the noise-free encoder logits, against the uniform prior over the K codes.
    """
    log_q = F.log_softmax(logits.float(), dim=1)
    per_position = (log_q.exp() * log_q).sum(1) + math.log(logits.shape[1])  # (B, h, w)
    return per_position.flatten(1).sum(1)


def bits_per_dim(nats: torch.Tensor, dims: int) -> torch.Tensor:
    """Nats per example → bits per dimension. (The logit-Laplace is a density over continuous mapped
    pixels, so these bits can be negative and are not comparable with discrete-pixel likelihoods.)"""
    return nats / (dims * math.log(2.0))


def code_histogram(codes: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """How often each code occurs in `codes` (any shape of integer codes) → (K,) float counts."""
    return torch.bincount(codes.reshape(-1), minlength=vocab_size).float()


def codebook_perplexity(codes: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """exp(entropy) of the empirical code distribution: 1 when one code is used, K when all are used evenly."""
    p = code_histogram(codes, vocab_size)
    p = p / p.sum()
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


def used_fraction(codes: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The fraction of the K codes that occur at least once in `codes`."""
    return (code_histogram(codes, vocab_size) > 0).float().mean()


def elbo_loss(model: torch.nn.Module, x: torch.Tensor, tau: float, beta: float,
              commitment_weight: float = 0.25, likelihood: str = "logit-laplace",
              sigma: float = 0.07) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of one batch of images x in [0, 1], shape (B, C, H, W), and its metrics.

    gumbel (§2.1, App. A.2): −ELB with the KL weighted by β, normalised like the paper:
        loss = mean_B[ Σ_{pixels×channels} −ln f(x | μ, b) + β · Σ_{positions} KL(q ‖ U) ] / (H·W·C)
    The decoder sees the gumbel-softmax sample at temperature τ in forward and backward.

    `likelihood` is the model config's: the paper's "logit-laplace" or "gaussian" with std `sigma` (see
    `pixel_nll`); either way the sum over pixels × channels is the reconstruction term.

    vq: the posterior is one-hot, so its KL to the uniform prior is the constant log K per position and adds
    nothing to the gradient; the loss is the reconstruction term plus `commitment_weight` · ‖z − sg(e)‖²
    (the codebook itself follows an EMA of the encoder outputs). τ and β are ignored.

    `model` may be wrapped (DDP): only its forward is called. The metrics are detached 0-d tensors
    (call `.item()` when logging, not every step, to avoid a device sync).
    """
    out = model(x, tau)
    channels, dims = x.shape[1], x[0].numel()
    stats = out.stats.float()
    mu = stats[:, :channels]
    nll = pixel_nll(map_pixels(x.float()), stats, likelihood, sigma).flatten(1).sum(1)  # (B,) nats per image
    positions, vocab_size = out.logits[0, 0].numel(), out.logits.shape[1]
    if out.commitment is None:
        kl = kl_to_uniform(out.logits)  # (B,)
        loss = (nll + beta * kl).mean() / dims
    else:
        kl = torch.full_like(nll, positions * math.log(vocab_size))
        loss = nll.mean() / dims + commitment_weight * out.commitment
    codes = out.logits.detach().argmax(1)
    with torch.no_grad():
        recon = unmap_pixels(torch.sigmoid(mu))
        metrics = {
            "loss": loss.detach(),
            "recon_nll": nll.mean() / dims,  # nats per dimension
            "kl": kl.mean(),  # nats per image
            "bpd": bits_per_dim((nll + kl).mean(), dims),  # −ELB (β = 1), bits per dimension
            "mse": F.mse_loss(recon, x.float()),  # of the relaxed reconstruction, on [0, 1] pixels
            "perplexity": codebook_perplexity(codes, vocab_size),
            "used": used_fraction(codes, vocab_size),
        }
        if out.commitment is not None:
            metrics["commitment"] = out.commitment.detach()
    return loss, metrics


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Cosine interpolation from `start` at step 0 to `end` at step `total`, then constant (App. A.2)."""
    if total <= 0 or step >= total:
        return end
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * max(step, 0) / total))


@dataclass(frozen=True)
class DVAESchedule:
    """τ, β and learning rate per update (App. A.2); the defaults are the paper's (3M updates in all)."""

    tau_start: float = 1.0
    tau_end: float = 1 / 16  # a low final temperature closes the gap between the relaxation and the true ELB
    tau_steps: int = 150_000  # cosine: a linear τ schedule tended to diverge
    beta_start: float = 0.0  # starting the KL at zero keeps the codes from collapsing before the decoder uses them
    beta_end: float = 6.6  # the paper's value: better codebook usage and a *lower* final reconstruction error
    beta_steps: int = 5_000
    lr_start: float = 1e-4
    lr_end: float = 1.25e-6
    lr_steps: int = 1_200_000

    def tau(self, step: int) -> float:
        return cosine(step, self.tau_steps, self.tau_start, self.tau_end)

    def beta(self, step: int) -> float:
        return cosine(step, self.beta_steps, self.beta_start, self.beta_end)

    def lr(self, step: int) -> float:
        return cosine(step, self.lr_steps, self.lr_start, self.lr_end)
