"""The shapes world: a synthetic image–caption source whose every image can be checked exactly.

Normative spec: /work/shared/specs/shapes-world.md. Rendering is a pure function of
(seed, index, size, split): a local `random.Random` seeded from a hash of those values, pixels
painted from integer-exact masks with numpy (no anti-aliasing, no PIL drawing primitives), so
the same arguments give byte-identical pixels and captions on every machine.

Coordinates: x is the column, y the row (downwards); pixel (row r, col c) covers [c, c+1]×[r, r+1].
An object of size d whose box starts at pixel (x0, y0) covers columns x0..x0+d-1 and rows
y0..y0+d-1; its centre is (x0 + d/2, y0 + d/2), which is what the metadata records.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from functools import lru_cache

import numpy as np
from PIL import Image

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 200, 20),
    "purple": (150, 50, 200),
    "cyan": (0, 190, 200),
}
BACKGROUND = (255, 255, 255)
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Relation phrases exactly as captions (and the metadata) write them; the first object named is the subject.
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
OPPOSITE: dict[str, str] = {"to the left of": "to the right of", "to the right of": "to the left of",
                            "above": "below", "below": "above"}
# (colour, shape) pairs that never appear in `train`: the zero-shot test of composition.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "square"), ("blue", "cross"), ("yellow", "circle")})
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
SEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT)
SPLITS: tuple[str, ...] = ("train", "val", "test-seen", "test-zeroshot")
SUPPORTED_SIZES: tuple[int, ...] = (32, 64, 128, 256)
# Object size d as a fraction of the canvas, in hundredths: small 0.22·S, large 0.40·S (one-object scenes),
# medium 0.28·S (every object of a two-object scene).
SIZES: dict[str, int] = {"small": 22, "medium": 28, "large": 40}
MARGIN = 2  # px between every object box and the canvas edge

# Caption templates; the metadata's "template" is the index in this tuple.
TEMPLATES: tuple[str, ...] = (
    "a {c} {s}",
    "a {z} {c} {s}",
    "one {c} {s}",
    "a picture of a {c} {s}",
    "a {c} {s} on a white background",
    "a {c1} {s1} {r} a {c2} {s2}",
    "a {c1} {s1} and a {c2} {s2}",
)
ONE_OBJECT_TEMPLATES = (0, 1, 2, 3, 4)
RELATION_TEMPLATE, AND_TEMPLATE = 5, 6


def check_canvas_size(size: int) -> int:
    if size not in SUPPORTED_SIZES:
        raise ValueError(f"shapes canvas size {size!r} is not supported; use one of {SUPPORTED_SIZES}")
    return size


def object_size(name: str, S: int) -> int:
    """Side d of an object's box for size `name` ('small', 'medium', 'large') on an S×S canvas: round(f·S)."""
    if name not in SIZES:
        raise ValueError(f"unknown object size {name!r}; expected one of {tuple(SIZES)}")
    check_canvas_size(S)
    return (SIZES[name] * S + 50) // 100  # integer round-half-up of f·S (no supported S lands on .5)


@lru_cache(maxsize=None)
def shape_mask(shape: str, d: int) -> np.ndarray:
    """(d, d) bool mask of `shape` inside its d×d box, exact integer rasterisation (pixel centres).

    circle: pixel centre within the disc of diameter d; square: every pixel; triangle: apex at the top
    centre, base the bottom edge, a pixel is in where its centre lies within the triangle's half-width
    at the row's lower edge (so the box is exactly d×d for every d); cross: two bars of thickness
    t = round(d/3), t pixels wide, starting at (d - t) // 2 (half a pixel off centre when d - t is odd).
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    y, x = np.mgrid[0:d, 0:d]
    u, v = 2 * x + 1 - d, 2 * y + 1 - d  # twice the offset of the pixel centre from the box centre
    if shape == "circle":
        m = u * u + v * v <= d * d
    elif shape == "square":
        m = np.ones((d, d), dtype=bool)
    elif shape == "triangle":
        m = np.abs(u) <= y + 1  # |x + 1/2 - d/2| <= (y + 1)/2: half-width (y+1)/2 at the row's lower edge
    else:
        t = (d + 1) // 3 if d % 3 == 2 else d // 3  # round(d/3): d/3 is never a .5
        lo = (d - t) // 2
        bar_x = (x >= lo) & (x < lo + t)
        bar_y = (y >= lo) & (y < lo + t)
        m = bar_x | bar_y
    m.setflags(write=False)
    return m


def _rng(seed: int, split: str, index: int) -> random.Random:
    digest = hashlib.sha256(f"shapes-world:{seed}:{split}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _draw_pairs(rng: random.Random, split: str, n: int) -> list[tuple[str, str]]:
    """n distinct (colour, shape) pairs: only seen ones, except in test-zeroshot where at least one is held out."""
    if split != "test-zeroshot":
        return rng.sample(SEEN_PAIRS, n)
    while True:  # rejection keeps every qualifying combination equally likely
        pairs = rng.sample(ALL_PAIRS, n)
        if any(p in HELD_OUT for p in pairs):
            return pairs


def _place_pair(rng: random.Random, S: int, d: int, relation: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Box corners (x0, y0) of subject and object, uniform over all placements satisfying `relation`.

    Main axis: centres differ by >= 0.40·S in the stated direction; cross axis: by <= 0.12·S. As 0.40·S > d,
    the boxes never overlap. Both objects have the same d, so centre differences equal corner differences.
    """
    hi = S - MARGIN - d  # largest corner coordinate inside the margin
    sign = -1 if relation in ("to the left of", "above") else 1  # sign of (subject - object) on the main axis
    while True:
        a, b = rng.randint(MARGIN, hi), rng.randint(MARGIN, hi)
        if (a - b) * sign > 0 and 5 * abs(a - b) >= 2 * S:  # |Δ| >= 0.40·S
            break
    while True:
        p, q = rng.randint(MARGIN, hi), rng.randint(MARGIN, hi)
        if 25 * abs(p - q) <= 3 * S:  # |Δ| <= 0.12·S
            break
    if relation in ("to the left of", "to the right of"):
        return (a, p), (b, q)
    return (p, a), (q, b)


def render_scene(seed: int, index: int, size: int = 64, split: str = "train", *,
                 two_object_fraction: float = 0.5) -> tuple[Image.Image, str, dict]:
    """Render scene `index` of `split`: (RGB image, caption, metadata). Pure function of its arguments.

    Metadata: {"objects": [{"color", "shape", "size", "cx", "cy", "d"}], "relation": phrase or None,
    "template": index into TEMPLATES, "split": split}. The relation is None for one-object scenes and for
    the "and" template (whose placement still satisfies a randomly drawn relation). The caption does not
    depend on `size` (only the placement does).
    """
    S = check_canvas_size(size)
    if split not in SPLITS:
        raise ValueError(f"unknown shapes split {split!r}; expected one of {SPLITS}")
    if index < 0 or seed < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    rng = _rng(seed, split, index)
    canvas = np.full((S, S, 3), 255, dtype=np.uint8)  # (H, W, RGB)

    if rng.random() >= two_object_fraction:  # one object, small or large, anywhere inside the margin
        (c, s), = _draw_pairs(rng, split, 1)
        z = rng.choice(("small", "large"))
        k = rng.choice(ONE_OBJECT_TEMPLATES)
        d = object_size(z, S)
        corners = [(rng.randint(MARGIN, S - MARGIN - d), rng.randint(MARGIN, S - MARGIN - d))]
        objects = [(c, s, z, d)]
        relation = None
        caption = TEMPLATES[k].format(c=c, s=s, z=z)
    else:  # two objects, medium, related
        (c1, s1), (c2, s2) = _draw_pairs(rng, split, 2)
        choice = rng.randrange(len(RELATIONS) + 1)  # the four relations and the "and" template, uniformly
        if choice < len(RELATIONS):
            k, relation = RELATION_TEMPLATE, RELATIONS[choice]
            placed = relation
        else:
            k, relation = AND_TEMPLATE, None
            placed = rng.choice(RELATIONS)
        d = object_size("medium", S)
        corners = list(_place_pair(rng, S, d, placed))
        objects = [(c1, s1, "medium", d), (c2, s2, "medium", d)]
        caption = TEMPLATES[k].format(c1=c1, s1=s1, c2=c2, s2=s2, r=relation)

    meta_objects = []
    for (c, s, z, d), (x0, y0) in zip(objects, corners):
        canvas[y0:y0 + d, x0:x0 + d][shape_mask(s, d)] = PALETTE[c]
        meta_objects.append({"color": c, "shape": s, "size": z, "cx": x0 + d / 2, "cy": y0 + d / 2, "d": d})
    meta = {"objects": meta_objects, "relation": relation, "template": k, "split": split}
    return Image.fromarray(canvas), caption, meta  # (S, S, 3) uint8 → RGB


def iter_scenes(split: str, count: int, seed: int = 0, size: int = 64,
                start: int = 0) -> Iterator[tuple[str, Image.Image, str, dict]]:
    """Yield (key, image, caption, meta) for scenes start .. start+count-1; keys 'shapes-{split}-{index:07d}'."""
    check_canvas_size(size)
    if split not in SPLITS:
        raise ValueError(f"unknown shapes split {split!r}; expected one of {SPLITS}")
    for index in range(start, start + count):
        image, caption, meta = render_scene(seed, index, size, split)
        yield f"shapes-{split}-{index:07d}", image, caption, meta
