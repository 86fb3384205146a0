"""The stage-2 attention masks: dense causal, and the paper's sparse layout (§2.2, App. B.1, Fig. 11).

Masks are boolean (T, T) matrices over the transformer's input stream, `True` = may attend, in the
convention of `torch.nn.functional.scaled_dot_product_attention` (query rows, key columns):

    positions 0 .. text_len-1                text tokens
    positions text_len .. text_len+grid²-1   the image block: position text_len+p holds the start-of-image
                                             token (p = 0) or image token p-1, and predicts image token p

Image-block position p is given the grid cell (p // grid, p % grid) of the token it predicts, so the image
block is a grid×grid array of states, the array the paper transposes for column attention. As matrices over
the stream these masks equal the paper's Fig. 11 (and ru-DALL-E's `get_row_mask` / `get_col_mask` /
`get_conv_mask`) for text length text_len and an image of grid² tokens.

Every layer: text→text causal; every image position attends to all text positions; nothing attends to a later
position. Image→image, per layer (1-based layer index i, as in the paper):
- "row":    the last grid+1 positions, i.e. a row's length back, reaching the same column of the previous row
            (q - k <= grid). Layers 1..n-1 use it, except:
- "column": the same column of every earlier row ((q - k) mod grid == 0), in layers where (i - 2) mod 4 == 0
            (i = 2, 6, 10, ...).
- "conv":   a causal 11×11 convolutional neighbourhood (|row_q - row_k| <= 5 and |col_q - col_k| <= 5, key
            not after the query), in the last layer. ru-DALL-E wraps this window around the grid's edges;
            we do not: a 2-D neighbourhood that wraps is not a neighbourhood.
"""
from __future__ import annotations

import torch

KINDS = ("row", "column", "conv")
CONV_KERNEL = 11  # App. B.1: "causal convolutional attention mask" with an 11×11 kernel in the last layer


def paper_layer_kinds(n_layers: int) -> list[str]:
    """The image→image mask kind of each layer, `kinds[i - 1]` for the paper's 1-based layer index i."""
    kinds = []
    for i in range(1, n_layers + 1):
        if i == n_layers:
            kinds.append("conv")
        elif (i - 2) % 4 == 0:
            kinds.append("column")
        else:
            kinds.append("row")
    return kinds


def causal_mask(seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(T, T) lower-triangular boolean mask: the dense layout."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()


def image_attention_mask(kind: str, text_len: int, grid: int, kernel: int = CONV_KERNEL,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """(T, T) boolean mask of one layer kind ("row" | "column" | "conv"), T = text_len + grid²."""
    if kind not in KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; expected one of {', '.join(KINDS)}")
    seq_len = text_len + grid * grid
    q = torch.arange(seq_len, device=device)[:, None]  # (T, 1) query positions
    k = torch.arange(seq_len, device=device)[None, :]  # (1, T) key positions
    causal = k <= q
    key_is_text = k < text_len  # every query sees all (earlier) text; text queries see only text
    if kind == "row":
        image = q - k <= grid
    elif kind == "column":
        image = (q - k) % grid == 0
    else:
        pq, pk = (q - text_len).clamp(min=0), (k - text_len).clamp(min=0)  # image-block indices
        half = kernel // 2
        image = ((pq // grid - pk // grid).abs() <= half) & ((pq % grid - pk % grid).abs() <= half)
    return causal & (key_is_text | image)


def paper_layer_masks(text_len: int, grid: int, n_layers: int,
                      device: torch.device | str | None = None) -> list[torch.Tensor]:
    """Per-layer (T, T) boolean masks of the paper's layout; layers of one kind share one tensor."""
    unique = {kind: image_attention_mask(kind, text_len, grid, device=device)
              for kind in set(paper_layer_kinds(n_layers))}
    return [unique[kind] for kind in paper_layer_kinds(n_layers)]
