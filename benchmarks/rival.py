"""The rival (DALLE-pytorch 1.6.6) measured in the same process as our figures: `python -m benchmarks --rival`.

The rival's numbers in `common.RIVAL` were measured once on this machine. Its speed drifts with the machine's
phase as ours does (20–30% on this shared VM), so a ratio to a constant moves with the phase. With `--rival`,
each benchmark that compares with the rival is bracketed by the rival's own figure at the same shape, measured
just before and just after it in the same process; the reference becomes the geometric mean of the two, and the
constant stays in the config (`rival_recorded`) beside the two measurements.

What is timed, as the constants were taken (one process, the machine's default threads, median):
  - training: `DALLE(text, image_codes, return_loss=True)`, backward, an Adam step (its training script's
    optimiser); tokens/s = batch · (text_len + image_len) / step time; fp32, as it trains on a CPU;
  - cached sampling: its `generate_images` loop over the image positions with its KV cache passed to the model
    (inside `generate_images` the cache flag is dropped at the default guidance scale), its top-k filter
    (0.5) and Gumbel draw; image tokens/s;
  - `generate_images` itself (each step recomputes the prefix); not at the paper stream (≈ 460 s per image);
  - its `DiscreteVAE` (3 down-samplings, 512 codes, hidden 64, its defaults otherwise), batch 16: a training
    step (loss, backward, Adam) and `get_codebook_indices`; images/s.
Model shapes: `common.SHAPES` (`small`: d 256, 4 layers, 8 heads × 32; `paper-stream`: d 512, 8 layers,
8 heads × 64), its defaults otherwise (rotary embeddings, token shift), as in the recorded measurements.

DALLE-pytorch and the packages it imports are not dependencies of the project; `make rival-env` builds
`.venv-rival` (the project's environment plus `benchmarks/rival-requirements.txt`).
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Callable

import torch

from benchmarks.common import (RIVAL, RIVAL_NAME, SHAPES, TARGET_SAMPLE_CACHED, TARGET_TRAIN, Result, fake_batch,
                               measure, median)

# benchmark name → (RIVAL shape key, RIVAL field, the target ratio where the benchmark states one, else None)
MEASURED: dict[str, tuple[str, str, float | None]] = {
    "prior_train_small": ("small", "train_tok_s", TARGET_TRAIN),
    "prior_train_small_bf16": ("small", "train_tok_s", TARGET_TRAIN),
    "prior_train_paper_stream": ("paper-stream", "train_tok_s", TARGET_TRAIN),
    "prior_train_paper_stream_bf16": ("paper-stream", "train_tok_s", TARGET_TRAIN),
    "sample_uncached_small": ("small", "sample_generate_images_tok_s", None),
    "sample_cached_small": ("small", "sample_cached_tok_s", TARGET_SAMPLE_CACHED),
    "sample_cached_paper_stream": ("paper-stream", "sample_cached_tok_s", TARGET_SAMPLE_CACHED),
    "dvae_train_tiny": ("dvae_64", "train_img_s", TARGET_TRAIN),
    "dvae_train_tiny_bf16": ("dvae_64", "train_img_s", TARGET_TRAIN),
    "dvae_encode_tiny": ("dvae_64", "encode_img_s", None),
    "dvae_encode_tiny_bf16": ("dvae_64", "encode_img_s", None),
    "dvae_train_tiny_256": ("dvae_256", "train_img_s", TARGET_TRAIN),
    "dvae_encode_tiny_256": ("dvae_256", "encode_img_s", None),
}

SETUP_HINT = ("the rival is not installed in this environment: run `make rival-env`, then "
              "`.venv-rival/bin/python -m benchmarks --rival` (see docs/benchmarks.md)")


def available() -> str | None:
    """None where DALLE-pytorch imports, else why not (one line)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import dalle_pytorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001  (any import failure of its many dependencies)
        return f"{SETUP_HINT} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    version = getattr(dalle_pytorch, "__version__", "?")
    if version != "1.6.6":
        return f"DALLE-pytorch {version} is installed, the recorded figures are of 1.6.6: {SETUP_HINT}"
    return None


def _dalle(shape_key: str):
    from dalle_pytorch import DALLE, DiscreteVAE

    c = SHAPES[shape_key].prior
    # Its DiscreteVAE sets the grid (image_size / 2³) and the image vocabulary; the VAE itself is not run.
    vae = DiscreteVAE(image_size=8 * c.grid, num_layers=3, num_tokens=c.image_vocab, hidden_dim=64)
    return DALLE(dim=c.d_model, vae=vae, num_text_tokens=c.text_vocab, text_seq_len=c.text_len,
                 depth=c.n_layers, heads=c.n_heads, dim_head=c.d_model // c.n_heads)


def _train_fn(shape_key: str) -> tuple[Callable[[], None], int]:
    shape = SHAPES[shape_key]
    model = _dalle(shape_key).train()
    text, image = fake_batch(shape.prior, shape.train_batch)  # padding is token 0 for both (its own convention)
    optim = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-4)

    def step():
        optim.zero_grad(set_to_none=True)
        model(text, image, return_loss=True).backward()
        optim.step()

    return step, shape.train_batch * shape.prior.seq_len


def _sample_fn(shape_key: str, cached: bool) -> tuple[Callable[[], None], int]:
    from dalle_pytorch.dalle_pytorch import gumbel_sample, top_k

    shape = SHAPES[shape_key]
    c, batch = shape.prior, shape.sample_batch
    model = _dalle(shape_key).eval()
    text, _ = fake_batch(c, batch, seed=1)

    @torch.no_grad()
    def cached_loop():  # generate_images' loop with the cache handed to the model
        out, cache = text, {}
        for _ in range(c.image_len):
            logits = model(out[:, :c.text_len], out[:, c.text_len:], cache=cache)[:, -1, :]
            draw = gumbel_sample(top_k(logits, thres=0.5), temperature=1.0, dim=-1) - model.num_text_tokens
            out = torch.cat((out, draw[:, None]), dim=-1)

    @torch.no_grad()
    def generate_images():
        model.generate_images(text)

    return (cached_loop if cached else generate_images), batch * c.image_len


def _dvae_fn(shape_key: str, mode: str) -> tuple[Callable[[], None], int]:
    from dalle_pytorch import DiscreteVAE

    size, batch = int(shape_key.split("_")[1]), 16
    model = DiscreteVAE(image_size=size, num_layers=3, num_tokens=512, hidden_dim=64)
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    if mode == "encode":
        model.eval()

        @torch.no_grad()
        def encode():
            model.get_codebook_indices(images)

        return encode, batch
    model.train()
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        optim.zero_grad(set_to_none=True)
        model(images, return_loss=True).backward()
        optim.step()

    return step, batch


# RIVAL field → build(shape key) → (one call, units it produces)
_BUILDERS: dict[str, Callable[[str], tuple[Callable[[], None], int]]] = {
    "train_tok_s": _train_fn,
    "sample_cached_tok_s": lambda k: _sample_fn(k, cached=True),
    "sample_generate_images_tok_s": lambda k: _sample_fn(k, cached=False),
    "train_img_s": lambda k: _dvae_fn(k, "train"),
    "encode_img_s": lambda k: _dvae_fn(k, "encode"),
}


def rate(shape_key: str, field: str, budget_s: float = 20.0) -> float:
    """The rival's figure (units/s, median of up to 5 timed calls after one untimed) at that shape, now."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        fn, units = _BUILDERS[field](shape_key)
        times = measure(fn, warmup=1, reps=5, budget_s=budget_s)
    return units / median(times)


def rebase(result: Result, before: float, after: float, target: float | None) -> Result:
    """`result` with the rival measured around it as its reference (the geometric mean of the two figures)."""
    c = result.config
    key, field, _ = MEASURED[result.name]
    reference = math.sqrt(before * after)
    result.reference, result.ratio = reference, result.value / reference
    c["rival_recorded"] = RIVAL[key][field]
    c["rival_before"], c["rival_after"] = before, after
    c["reference_is"] = (f"{RIVAL_NAME} measured in this run ({reference:,.4g}; before {before:,.4g}, after "
                         f"{after:,.4g}, recorded {RIVAL[key][field]:,.4g})")
    if target is not None:
        c["meets_target"] = result.ratio >= target
    return result


class Bracket:
    """Measures the rival around each benchmark that has a counterpart; a figure measured right after one
    benchmark serves as the next one's "before" when it is of the same (shape, field). Where the rival fails
    (e.g. out of memory at `paper-stream`), our figure stays against the recorded constant, with the reason in
    `config.rival_error`."""

    def __init__(self, budget_s: float = 20.0, now: Callable[[str, str], float] | None = None):
        self.now = now or (lambda key, field: rate(key, field, budget_s))
        self.last: tuple[tuple[str, str], float] | None = None

    def _measure(self, key: str, field: str) -> tuple[float | None, str | None]:
        try:
            return self.now(key, field), None
        except Exception as exc:  # noqa: BLE001  (the rival's failure must not cost us our own figure)
            return None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"

    def run(self, name: str, bench: Callable[[], Result]) -> Result:
        if name not in MEASURED:
            self.last = None
            return bench()
        key, field, target = MEASURED[name]
        t0 = time.perf_counter()
        if self.last and self.last[0] == (key, field):
            before, error = self.last[1], None
        else:
            before, error = self._measure(key, field)
        t1 = time.perf_counter()
        result = bench()
        t2 = time.perf_counter()
        after, error = self._measure(key, field) if error is None else (None, error)
        self.last = None if error else ((key, field), after)
        if error:
            result.config["rival_error"] = error
            return result
        result = rebase(result, before, after, target)
        result.config["rival_s"] = round(t1 - t0 + time.perf_counter() - t2, 1)
        return result
