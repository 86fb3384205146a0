"""The stage-2 prior: a decoder-only transformer over text tokens then image tokens (§2.2, App. B).

The input stream, T = text_len + grid² positions (teacher forcing):

    text[0] … text[L-1] | BOS  image[0] … image[N-2]          L = text_len, N = grid²
    predicts:
    text[1] … text[L-1]  (BOS)| image[0] … image[N-1]

- Position t predicts the token at t + 1. Text positions 0..L-2 give the text logits (the first text token
  is never predicted); position L-1 would predict BOS, which is known, so it has no output; the image block
  (BOS then image[:-1]) predicts every image token.
- A text position holding the padding id gets that position's own learned padding embedding (§2.2: "a special
  padding token separately for each of the 256 text positions"), a (text_len, d) table.
- Image embedding = token + row + column embeddings (App. B.1); text positions have their own embeddings.
- Two heads: text logits only over the text vocabulary, image logits only over the image vocabulary. Sharing
  one softmax over both would spend probability on tokens of the wrong modality at every position.
- Heads run in fp32 even under autocast (§2.4: fp16 logits shifted the loss curve); the residual stream stays
  in the dtype of the embeddings (fp32), the blocks compute in the autocast dtype.

Incremental decoding (for the sampler): `cache = model.init_cache(B)`, `model.prefill(cache, text, prompt)`
runs text + BOS (+ image-prompt tokens) and returns the logits of the next image token; each
`model.decode_step(cache, token)` feeds one token and returns the next logits. Both give exactly the full
forward's logits, in either attention layout (a paper-layout step uses its own row of the layer's mask).
Classifier-free guidance needs nothing special: a batch of captions and empty (all-padding) captions.

Choices the paper leaves open (App. B names none of them): pre-norm LayerNorm (GPT-2; trains stably without
warm-up tricks), GELU, N(0, 0.02) init with residual projections scaled by 1/sqrt(2·n_layers) (GPT-2),
biases on (GPT-2), no weight tying (App. D keeps "embeddings and unembeddings" apart, in fp32).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dallecli.models.masks import image_attention_mask, paper_layer_kinds
from dallecli.models.onednn import Linear, linear


@dataclass(frozen=True)
class PriorConfig:
    text_vocab: int         # tokenizer size, specials included
    text_len: int           # text positions; the paper uses 256
    image_vocab: int        # dVAE codebook size (paper 8192)
    grid: int               # image side in tokens (paper 32: 1024 image tokens)
    d_model: int
    n_layers: int
    n_heads: int
    mlp_ratio: int = 4      # App. B: MLP width 4·d
    dropout: float = 0.0    # not stated; a 12B model on 250M pairs needs none, small data may want 0.1
    attention: Literal["dense", "paper"] = "dense"  # dense causal runs flash kernels; "paper" = §2.2 masks
    checkpoint_activations: bool = False  # §2.4: recompute each block in backward to save memory
    pad_id: int = 0         # the tokenizer's padding id; those positions use the per-position pad table
    init_std: float = 0.02  # GPT-2 init; residual projections get init_std / sqrt(2·n_layers)

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.attention not in ("dense", "paper"):
            raise ValueError(f"attention must be 'dense' or 'paper', got {self.attention!r}")
        if not 0 <= self.pad_id < self.text_vocab:
            raise ValueError(f"pad_id {self.pad_id} is outside the text vocabulary of {self.text_vocab}")

    @property
    def image_len(self) -> int:
        return self.grid * self.grid

    @property
    def seq_len(self) -> int:
        """Positions the transformer sees: text_len + 1 (BOS) + grid² - 1 (the last image token is only a target)."""
        return self.text_len + self.image_len


PRESETS: dict[str, PriorConfig] = {
    # Tests and the quickest CPU demo: 4 heads × 32, about 1M parameters.
    "tiny": PriorConfig(text_vocab=512, text_len=32, image_vocab=512, grid=8,
                        d_model=128, n_layers=4, n_heads=4),
    # The benchmark shape (text 32 + image 64 tokens, 8 heads × 32) and a CPU demo on the shapes world
    # (64 image tokens from an 8× downsampling dVAE); about 4.0M parameters.
    "small": PriorConfig(text_vocab=1024, text_len=32, image_vocab=512, grid=8,
                         d_model=256, n_layers=4, n_heads=8),
    # A single-GPU model on the paper's stream (256 text + 32×32 image tokens), about 0.35B parameters.
    "base": PriorConfig(text_vocab=16384, text_len=256, image_vocab=8192, grid=32,
                        d_model=1024, n_layers=24, n_heads=16),
    # §2.2 / App. B: 64 layers, 62 heads × 64, sparse masks, activation checkpointing: ≈ 12B parameters.
    "paper": PriorConfig(text_vocab=16384, text_len=256, image_vocab=8192, grid=32,
                         d_model=3968, n_layers=64, n_heads=62, attention="paper", checkpoint_activations=True),
}


@dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding; `length` positions are filled."""
    k: torch.Tensor  # (n_layers, B, nh, max_len, hs)
    v: torch.Tensor  # (n_layers, B, nh, max_len, hs)
    length: int = 0
    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(init=False, repr=False)  # per layer: (k, v) views

    def __post_init__(self):
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0)))  # made once: a decode step indexes them


# Under CPU autocast, attention over fewer keys than this runs in fp32: PyTorch's CPU flash kernel is ~2.5×
# slower in bf16 than in fp32 at 96 keys, and 1.5× faster at 1,280 (a 13% faster bf16 training step at the
# paper's stream on the benchmark machine). At a single query (decoding) it is ~3× slower in bf16 at any
# length: there the keys and values are widened to fp32 (`attend`, `CPUDecoder`).
CPU_BF16_ATTENTION_FROM = 512


def attend(q, k, v, mask, dropout_p):
    """Fused softmax(q·kᵀ/√hs)·v; mask (t, T) bool, or None for causal (or no mask for a single query).
    On the CPU, short streams under autocast and single queries attend in fp32 (`CPU_BF16_ATTENTION_FROM`)."""
    is_causal = mask is None and q.size(2) > 1
    if q.device.type == "cpu" and ((torch.is_autocast_enabled("cpu") and k.size(2) < CPU_BF16_ATTENTION_FROM)
                                   or (q.size(2) == 1 and k.dtype != torch.float32)):
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                               is_causal=is_causal, dropout_p=dropout_p)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)


class SelfAttention(nn.Module):
    def __init__(self, config: PriorConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.c_attn = Linear(config.d_model, 3 * config.d_model)
        self.c_proj = Linear(config.d_model, config.d_model)
        self.dropout = config.dropout
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x, mask=None, kv=None, start=0):
        """x (B, t, d) at stream positions start..start+t-1; mask (t, start+t) bool or None (= causal);
        kv: this layer's (k, v) cache slabs (B, nh, max_len, hs), written at start..start+t-1."""
        B, t, d = x.shape
        q, k, v = self.c_attn(x).view(B, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)  # 3×(B, nh, t, hs)
        if kv is not None:
            kv[0][:, :, start:start + t] = k
            kv[1][:, :, start:start + t] = v
            k, v = kv[0][:, :, :start + t], kv[1][:, :, :start + t]  # (B, nh, start+t, hs)
            q = q.to(k.dtype)  # a cache kept in another dtype than the computation's
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, nh, t, hs)
        y = y.transpose(1, 2).reshape(B, t, d)  # (B, t, d)
        return self.resid_drop(self.c_proj(y))

    def step(self, x, mask, k_cache, v_cache, pos):
        """One position with fixed shapes (see StaticDecoder): x (B, 1, d) at stream position `pos` (a 0-d long
        tensor); writes its key and value at `pos`, attends over the whole cache under `mask` (..., max_len)."""
        B, _, d = x.shape
        q, k, v = self.c_attn(x).view(B, 1, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        k_cache.index_copy_(2, pos.view(1), k.to(k_cache.dtype))
        v_cache.index_copy_(2, pos.view(1), v.to(v_cache.dtype))
        y = F.scaled_dot_product_attention(q.to(k_cache.dtype), k_cache, v_cache, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, 1, d))


class MLP(nn.Module):
    def __init__(self, config: PriorConfig):
        super().__init__()
        self.c_fc = Linear(config.d_model, config.mlp_ratio * config.d_model)
        self.c_proj = Linear(config.mlp_ratio * config.d_model, config.d_model)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.drop(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Two resblocks (pre-norm residual branches): attention, then MLP."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, kv=None, start=0):
        x = x + self.attn(self.ln_1(x), mask, kv, start)
        return x + self.mlp(self.ln_2(x))

    def step(self, x, mask, k_cache, v_cache, pos):
        x = x + self.attn.step(self.ln_1(x), mask, k_cache, v_cache, pos)
        return x + self.mlp(self.ln_2(x))


class PriorTransformer(nn.Module):
    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = c = config
        d = c.d_model
        self.text_embed = nn.Embedding(c.text_vocab, d)
        self.text_pad = nn.Parameter(torch.empty(c.text_len, d))  # §2.2: one padding embedding per text position
        self.text_pos = nn.Parameter(torch.empty(c.text_len, d))
        self.bos = nn.Parameter(torch.empty(d))                     # start of image
        self.image_embed = nn.Embedding(c.image_vocab, d)
        self.image_row = nn.Parameter(torch.empty(c.grid, d))       # App. B.1: token + row + column
        self.image_col = nn.Parameter(torch.empty(c.grid, d))
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.text_head = Linear(d, c.text_vocab, bias=False)
        self.image_head = Linear(d, c.image_vocab, bias=False)
        if c.attention == "paper":  # one (T, T) mask per kind, shared by the layers of that kind
            kinds = paper_layer_kinds(c.n_layers)
            self.mask_kinds = sorted(set(kinds))
            self.mask_of_layer = [self.mask_kinds.index(kind) for kind in kinds]
            masks = torch.empty(len(self.mask_kinds), c.seq_len, c.seq_len, dtype=torch.bool)
            self.register_buffer("masks", masks, persistent=False)  # (n_kinds, T, T), filled below
        self.reset_parameters()

    def reset_parameters(self):
        """Initialise the parameters and build the masks (again after `to_empty` from the meta device)."""
        c, std = self.config, self.config.init_std
        if c.attention == "paper":
            for i, kind in enumerate(self.mask_kinds):
                self.masks[i] = image_attention_mask(kind, c.text_len, c.grid, device=self.masks.device)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.startswith("blocks.") and ("ln_1" in name or "ln_2" in name):
                nn.init.ones_(p)
            elif name == "ln_f.weight":
                nn.init.ones_(p)
            elif name.endswith("c_proj.weight"):  # GPT-2: scale the residual projections by depth
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * c.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    # -- embeddings -------------------------------------------------------------------------------------
    def embed_text(self, text):
        """text (B, L) ids → (B, L, d); padding positions take their own position's pad embedding."""
        tokens = torch.where((text == self.config.pad_id)[..., None], self.text_pad, self.text_embed(text))
        return tokens + self.text_pos

    def embed_image(self, image, offset=0):
        """image (B, n) codes of image tokens offset..offset+n-1 (raster order) → (B, n, d)."""
        index = torch.arange(offset, offset + image.size(1), device=image.device)
        grid = self.config.grid
        return self.image_embed(image) + self.image_row[index // grid] + self.image_col[index % grid]

    def embed_start(self, text, image):
        """The stream from position 0: text, BOS, then image tokens 0..n-1 → (B, L + 1 + n, d)."""
        bos = self.bos.expand(text.size(0), 1, -1)
        return torch.cat([self.embed_text(text), bos, self.embed_image(image)], dim=1)

    # -- the transformer ----------------------------------------------------------------------------------
    def _mask(self, layer, start, t):
        """Boolean mask rows for positions start..start+t-1 over keys 0..start+t-1; None = causal (dense)."""
        if self.config.attention == "dense":
            return None
        return self.masks[self.mask_of_layer[layer], start:start + t, :start + t]

    def run_blocks(self, x, start=0, cache=None):
        """x (B, t, d) at positions start..start+t-1 → final-norm states (B, t, d); fills `cache` if given."""
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            mask = self._mask(i, start, x.size(1))
            if cache is not None:
                x = block(x, mask, cache.layers[i], start)
            elif self.config.checkpoint_activations and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return self.ln_f(x)

    def _logits(self, head, h):
        with torch.autocast(h.device.type, enabled=False):  # §2.4: unembedding and logits in fp32
            return linear(h.float(), head.weight.float())  # also for a model held in bf16 (the GPU sampler)

    def forward(self, text, image):
        """text (B, text_len) ids, image (B, grid²) codes → text logits (B, text_len-1, text_vocab) for
        text[:, 1:], image logits (B, grid², image_vocab) for image; both fp32."""
        c = self.config
        self._check_shapes(text, image, c.image_len)
        x = self.embed_start(text, image[:, :-1])  # (B, T, d)
        h = self.run_blocks(x)
        return self._logits(self.text_head, h[:, :c.text_len - 1]), self._logits(self.image_head, h[:, c.text_len:])

    # -- incremental decoding -----------------------------------------------------------------------------
    def init_cache(self, batch, max_len=None, device=None, dtype=None) -> KVCache:
        """An empty cache for `batch` streams of up to `max_len` positions (default: the whole stream).
        `dtype` must be the dtype the attention computes in (the autocast dtype under autocast)."""
        c = self.config
        max_len = c.seq_len if max_len is None else max_len
        p = self.bos
        shape = (c.n_layers, batch, c.n_heads, max_len, c.d_model // c.n_heads)
        k = torch.zeros(shape, device=device or p.device, dtype=dtype or p.dtype)
        return KVCache(k=k, v=torch.zeros_like(k))

    @torch.no_grad()
    def prefill(self, cache: KVCache, text, image=None):
        """Run text + BOS (+ the first n image tokens, an image prompt) from position 0 into `cache`.
        text (B, text_len), image (B, n) or None → image logits (B, n + 1, image_vocab) fp32 for image
        tokens 0..n; the last row is the distribution of the first token to generate."""
        x = self.prefill_stream(cache, text, image)
        h = self.run_blocks(x, 0, cache)
        cache.length = x.size(1)
        return self._logits(self.image_head, h[:, self.config.text_len:])

    def prefill_stream(self, cache: KVCache, text, image=None):
        """The embedded stream a prefill runs (B, text_len + 1 + n, d), after checking the inputs and the
        cache's room for it."""
        c = self.config
        image = text.new_zeros(text.size(0), 0) if image is None else image
        self._check_shapes(text, image, image.size(1))
        if image.size(1) >= c.image_len:
            raise ValueError(f"an image prompt of {image.size(1)} tokens leaves nothing to generate "
                             f"(the image has {c.image_len})")
        x = self.embed_start(text, image)
        self._check_room(cache, 0, x.size(1))
        return x

    @torch.no_grad()
    def decode_step(self, cache: KVCache, token):
        """Feed the next image token (B,) at position cache.length → logits (B, image_vocab) fp32 of the one after."""
        index = self._next_image_index(cache)
        x = self.embed_image(token[:, None], index)  # (B, 1, d)
        h = self.run_blocks(x, cache.length, cache)
        cache.length += 1
        return self._logits(self.image_head, h[:, 0])

    def _next_image_index(self, cache: KVCache, caller: str = "decode_step") -> int:
        """The raster index of the image token fed at cache.length, checked against the stream and the cache."""
        c = self.config
        index = cache.length - c.text_len - 1
        if not 0 <= index < c.image_len - 1:
            raise ValueError(f"{caller} needs a prefilled cache with room for image token {index} "
                             f"(cache holds {cache.length} positions; the stream has {c.seq_len})")
        self._check_room(cache, cache.length, 1)
        return index

    def _check_shapes(self, text, image, image_len):
        c = self.config
        if text.dim() != 2 or text.size(1) != c.text_len or image.shape != (text.size(0), image_len):
            raise ValueError(f"expected text (B, {c.text_len}) and image (B, {image_len}) token tensors, "
                             f"got {tuple(text.shape)} and {tuple(image.shape)}")

    def _check_room(self, cache, start, t):
        if cache.k.size(0) != self.config.n_layers or start + t > cache.k.size(3):
            raise ValueError(f"the cache has {cache.k.size(0)} layers × {cache.k.size(3)} positions; this model "
                             f"needs {self.config.n_layers} layers × {start + t} (make it with init_cache)")

    # -- training helpers -----------------------------------------------------------------------------------
    def residual_branches(self) -> list[tuple[nn.Module, nn.Module]]:
        """§2.4: each resblock's residual branch as (first module, last module): its input enters the first
        module, its output leaves the last one; all their parameters belong to the branch."""
        return [pair for b in self.blocks for pair in ((b.ln_1, b.attn), (b.ln_2, b.mlp))]


class StaticDecoder(nn.Module):
    """`PriorTransformer.decode_step` with fixed shapes, for CUDA graphs (`torch.compile(...,
    mode="reduce-overhead")`): the K/V cache is this module's buffers, written in place; the position is a
    tensor; attention reads the whole cache under a mask of the filled positions. It gives the same logits
    as `decode_step`. It reads the full cache at every step (1280 positions instead of 770 on average at
    the paper's stream), so it pays where the step's fixed costs (kernel launches, Python) dominate: small
    batches on a GPU.

        decoder = StaticDecoder(model, cache)      # cache from model.init_cache, prefilled by model.prefill
        logits = decoder(token, pos)               # token (B,) at stream position pos (0-d long tensor)
    """

    def __init__(self, model: PriorTransformer, cache: KVCache):
        super().__init__()
        self.model = model
        self.register_buffer("k", cache.k, persistent=False)  # the same storage: prefill fills it
        self.register_buffer("v", cache.v, persistent=False)
        self.register_buffer("positions", torch.arange(cache.k.size(3), device=cache.k.device), persistent=False)

    def forward(self, token, pos):
        m, c = self.model, self.model.config
        index = pos - (c.text_len + 1)  # raster index of `token` in the image
        row, col = (index // c.grid).view(1), (index % c.grid).view(1)  # index_select: no data-dependent shapes
        x = m.image_embed(token[:, None]) + m.image_row.index_select(0, row) + m.image_col.index_select(0, col)
        visible = (self.positions <= pos).view(1, 1, 1, -1)  # keys 0..pos
        for i, block in enumerate(m.blocks):
            mask = visible
            if c.attention != "dense":
                row = m.masks[m.mask_of_layer[i]].index_select(0, pos.view(1))  # (1, seq_len): the layout's row
                mask = visible & F.pad(row, (0, self.k.size(3) - row.size(1))).view(1, 1, 1, -1)
            x = block.step(x, mask, self.k[i], self.v[i], pos)
        return m._logits(m.image_head, m.ln_f(x)[:, 0])


def text_targets(text: torch.Tensor, pad_id: int) -> int:
    """The text tokens `prior_loss` scores in a batch (its padding left out)."""
    return int((text[:, 1:] != pad_id).sum())


def prior_loss(text_logits, image_logits, text, image, pad_id, text_norm: float | None = None):
    """§2.2: 1/8 · text CE + 7/8 · image CE, each averaged over its own tokens in the batch.

    text (B, text_len) and image (B, grid²) are the model's inputs; the targets are text[:, 1:] and image.
    Text targets equal to `pad_id` are left out of the text loss: the per-position padding tokens are
    determined by the caption's length, so scoring them would mostly reward counting. A batch with no text
    target (all captions empty) has text loss 0. `text_norm` replaces this batch's own text token count where
    the batch is one of several micro-batches (the training loop passes the global batch's mean count per
    micro-batch). Returns (loss, {"text_loss", "image_loss"}) (detached)."""
    targets = text[:, 1:]
    count = (targets != pad_id).sum().clamp(min=1) if text_norm is None else text_norm
    text_loss = F.cross_entropy(text_logits.float().flatten(0, 1), targets.flatten(),
                                ignore_index=pad_id, reduction="sum") / count
    image_loss = F.cross_entropy(image_logits.float().flatten(0, 1), image.flatten())
    loss = text_loss / 8 + image_loss * 7 / 8
    return loss, {"text_loss": text_loss.detach(), "image_loss": image_loss.detach()}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on the weights of linear layers only; none on gains, biases, embeddings."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (decay if isinstance(module, nn.Linear) and name == "weight" else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(config: PriorConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward): 6·N + 12·L·d·T.

    N = weights a token multiplies by: all blocks, plus the head its position uses (the text head for the
    text_len-1 text outputs, the image head for the grid² image outputs, averaged over the T positions);
    L = layers, d = d_model, T = seq_len (default config.seq_len). 12·L·d·T is attention's QKᵀ and AV
    products, counted dense (the paper's sparse masks skip work only with a block-sparse kernel)."""
    c = config
    T = c.seq_len if seq_len is None else seq_len
    d, h = c.d_model, c.mlp_ratio * c.d_model
    per_layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d) + 4 * d
    heads = ((c.text_len - 1) * c.text_vocab + c.image_len * c.image_vocab) / c.seq_len * d
    n = c.n_layers * per_layer + 2 * d + heads
    return 6 * n + 12 * c.n_layers * d * T

