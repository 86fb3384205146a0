"""Small image helpers shared by the stages: tensors ↔ PIL, the paper's crops, captioned grids."""
from __future__ import annotations

import functools
import unicodedata
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB → (3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] → PIL RGB (rounded, clamped)."""
    arr = x.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


def dvae_augment(image: Image.Image, size: int, rng: np.random.Generator, flip: bool = True) -> Image.Image:
    """App. A.2's augmentation, scaled to an output of `size` (the paper's numbers are for 256):
    random square crop, area-resize to t ∈ [min(s, 1.125·size), min(s, 1.5·size)], random `size` crop,
    random horizontal flip. On images already stored at `size` this reduces to the flip."""
    w, h = image.size
    s = min(w, h)
    if (w, h) != (s, s):
        x0, y0 = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        image = image.crop((x0, y0, x0 + s, y0 + s))
    lo, hi = min(s, round(1.125 * size)), min(s, round(1.5 * size))
    t = max(size, int(rng.integers(lo, hi + 1)) if hi > lo else lo)
    if t != s:
        image = image.resize((t, t), Image.BOX if t < s else Image.BICUBIC)
    if t > size:
        x0, y0 = int(rng.integers(0, t - size + 1)), int(rng.integers(0, t - size + 1))
        image = image.crop((x0, y0, x0 + size, y0 + size))
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image


def center_square(image: Image.Image, size: int) -> Image.Image:
    """Centre crop to a square and resize to `size` (what `encode` and evaluation use)."""
    w, h = image.size
    s = min(w, h)
    if (w, h) != (s, s):
        image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return image if s == size else image.resize((size, size), Image.BICUBIC if s < size else Image.LANCZOS)


def grid(images: list[Image.Image], cols: int, captions: list[str] | None = None, pad: int = 2,
         scale: int = 1) -> Image.Image:
    """Tile images (all the same size) into a grid on white, with an optional caption under each."""
    if not images:
        raise ValueError("grid of no images")
    w, h = images[0].size
    w, h = w * scale, h * scale
    cols = max(1, min(cols, len(images)))
    rows = -(-len(images) // cols)
    font, readable = _label_font()
    line_h = font.getbbox("Ágy")[3] + 1  # the font's own height, accents and descenders included
    lines = [_wrap(readable(c), font, w)[:3] if c else [] for c in captions] if captions else None
    cap_h = line_h * max((len(ls) for ls in lines), default=0) + 2 if lines else 0
    sheet = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + cap_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        x, y = pad + c * (w + pad), pad + r * (h + cap_h + pad)
        sheet.paste(im.resize((w, h), Image.NEAREST) if scale != 1 else im, (x, y))
        if lines:
            for j, line in enumerate(lines[i]):
                draw.text((x, y + h + 1 + j * line_h), line, fill=(0, 0, 0), font=font)
    return sheet


def _wrap(text: str, font, width: int) -> list[str]:
    """Lines of `text` no wider than `width` pixels in `font` (at word breaks; a word wider than a line is cut)."""
    lines: list[str] = []
    for word in text.split():
        while font.getlength(word) > width and len(word) > 1:  # a word wider than a line: its own lines
            cut = 1
            while cut < len(word) and font.getlength(word[: cut + 1]) <= width:
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


@functools.cache
def _label_font() -> tuple[ImageFont.ImageFont | ImageFont.FreeTypeFont, Callable[[str], str]]:
    """The grids' caption font, and what makes a caption drawable in it. DejaVu Sans (on most Linux systems)
    draws accents and most scripts; Pillow's built-in font only ASCII, so without DejaVu an accented letter
    loses its accent ("carré" → "carre") and what has no ASCII form becomes "?", instead of an empty box."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", 10), lambda text: text
    except OSError:
        pass

    def ascii_only(text: str) -> str:
        plain = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
        return plain.encode("ascii", "replace").decode("ascii")

    return ImageFont.load_default(), ascii_only
