"""Check an image against a shapes-world caption (spec: /work/shared/specs/shapes-world.md, "Checking").

1. Every pixel → the nearest of white and the six palette colours, or ignored where it is more than FAR
   (RGB distance) from all seven; 4-connected regions of one colour.
2. Each region is measured on soft colour coverage around it (blurred, resampled or JPEG'd edges are
   blends with white): its mass (= its pixel count on a clean render) and its shape, by IoU with the four
   templates where the region is crisp, else by fitting the four ideal shapes to the coverage (fit_shape).
3. A named object is found where a region of its colour has mass >= 40% of the spec area for its size
   (the small size where a one-object caption names none) and the named shape; relations compare the
   two objects' box centres strictly on the relation's axis; a one-object caption also fails where a
   second region of substantial size (>= 40% of the smallest small object) is present.

`dallecli.evaluate.shapes_validate.validate(n, seed)` measures the checker on renders: clean, degraded,
altered captions, blank and noise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from dallecli.data.shapes import HELD_OUT, PALETTE, RELATIONS, SHAPES, SUPPORTED_SIZES, object_size, shape_mask

COLORS = tuple(PALETTE)
# Row 0 is the background; row i >= 1 is COLORS[i - 1].
REFERENCE = np.array([(255, 255, 255)] + [PALETTE[c] for c in COLORS], dtype=np.int32)  # (7, 3)
# _SQUARES[ch][v, i] = (v − REFERENCE[i, ch])²: squared distances by table look-up, no per-pixel arithmetic.
_SQUARES = ((np.arange(256)[None, :, None] - REFERENCE.T[:, None, :]) ** 2).astype(np.int32)  # (3, 256, 7)
# A pixel further than this from white and every palette colour is ignored. Below 99, the closest any
# blend of one palette colour with white comes to another palette colour (blue→purple), so blurred
# edges never read as a second colour; well above σ=8 noise (|n| ≈ 14 typical).
FAR = 80
MIN_AREA_FRACTION = 0.40  # spec: a region must be >= 40% of the area its size gives
MAX_ASPECT = 1.6          # every spec shape is square; a much longer box (or spread) is no shape of this world

_C = "(" + "|".join(COLORS) + ")"
_S = "(" + "|".join(SHAPES) + ")"
_R = "(" + "|".join(RELATIONS) + ")"
_PATTERNS: tuple[tuple[int, re.Pattern], ...] = tuple((k, re.compile(p)) for k, p in (
    (0, rf"a {_C} {_S}"),
    (1, rf"a (small|large) {_C} {_S}"),
    (2, rf"one {_C} {_S}"),
    (3, rf"a picture of a {_C} {_S}"),
    (4, rf"a {_C} {_S} on a white background"),
    (5, rf"a {_C} {_S} {_R} a {_C} {_S}"),
    (6, rf"a {_C} {_S} and a {_C} {_S}"),
))


@dataclass(frozen=True)
class NamedObject:
    color: str
    shape: str
    size: str | None  # 'small' / 'large' when the caption says so, 'medium' in two-object captions


@dataclass(frozen=True)
class ParsedCaption:
    objects: tuple[NamedObject, ...]  # the subject first
    relation: str | None              # a phrase of RELATIONS, or None (one object, or the "and" template)
    template: int                     # index into dallecli.data.shapes.TEMPLATES


def parse_caption(caption: str) -> ParsedCaption | None:
    """Parse any spec template (case, surrounding space and a final '.' tolerated); None if it is none."""
    text = " ".join(caption.lower().strip().rstrip(".").split())
    for k, pattern in _PATTERNS:
        m = pattern.fullmatch(text)
        if m is None:
            continue
        g = m.groups()
        if k == 1:
            return ParsedCaption((NamedObject(g[1], g[2], g[0]),), None, k)
        if k < 5:
            return ParsedCaption((NamedObject(g[0], g[1], None),), None, k)
        if k == 5:
            first, relation, second = (g[0], g[1]), g[2], (g[3], g[4])
        else:
            first, relation, second = (g[0], g[1]), None, (g[2], g[3])
        if first == second:  # the world never names the same pair twice
            return None
        return ParsedCaption((NamedObject(*first, "medium"), NamedObject(*second, "medium")), relation, k)
    return None


def category(caption: str) -> str:
    """'seen_single', 'zeroshot_single', 'relation_seen' or 'relation_zeroshot' (two objects, "and" included)."""
    parsed = parse_caption(caption)
    if parsed is None:
        raise ValueError(f"not a shapes-world caption: {caption!r}")
    zeroshot = any((o.color, o.shape) in HELD_OUT for o in parsed.objects)
    if len(parsed.objects) == 1:
        return "zeroshot_single" if zeroshot else "seen_single"
    return "relation_zeroshot" if zeroshot else "relation_seen"


# ---------------------------------------------------------------------------------------------- pixels

def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] != array.shape[1] \
            or array.shape[0] not in SUPPORTED_SIZES:
        raise ValueError(f"expected a square RGB image of side {SUPPORTED_SIZES}, got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {array.dtype}")
    return array


def classify_pixels(array: np.ndarray) -> np.ndarray:
    """(H, W) int8: 0 white, i >= 1 COLORS[i-1], -1 ignored (further than FAR from all seven)."""
    d2 = np.take(_SQUARES[0], array[..., 0], axis=0)  # (H, W, 7) squared RGB distances, summed per channel
    d2 += np.take(_SQUARES[1], array[..., 1], axis=0)
    d2 += np.take(_SQUARES[2], array[..., 2], axis=0)
    nearest = d2.argmin(-1)
    nearest[np.take_along_axis(d2, nearest[..., None], -1)[..., 0] > FAR * FAR] = -1
    return nearest.astype(np.int8)


def label_regions(cls: np.ndarray) -> np.ndarray:
    """(H, W) int32 region id per pixel: 4-connected pixels of one colour (cls >= 1) share the smallest
    flat index among them; every other pixel keeps its own index. Min-label propagation with pointer
    jumping (vectorised union–find): a few dozen numpy passes at 64 px."""
    H, W = cls.shape
    lab = np.arange(H * W, dtype=np.int32).reshape(H, W)
    colour = cls >= 1
    same_h = colour[:, :-1] & (cls[:, :-1] == cls[:, 1:])  # pixel and its right neighbour joined
    same_v = colour[:-1, :] & (cls[:-1, :] == cls[1:, :])  # pixel and the one below joined
    if not (same_h.any() or same_v.any()):
        return lab
    while True:
        new = lab.copy()
        np.minimum(new[:, :-1], np.where(same_h, lab[:, 1:], new[:, :-1]), out=new[:, :-1])
        np.minimum(new[:, 1:], np.where(same_h, lab[:, :-1], new[:, 1:]), out=new[:, 1:])
        np.minimum(new[:-1, :], np.where(same_v, lab[1:, :], new[:-1, :]), out=new[:-1, :])
        np.minimum(new[1:, :], np.where(same_v, lab[:-1, :], new[1:, :]), out=new[1:, :])
        flat = new.reshape(-1)
        while True:  # pointer jumping: a pixel takes its label's label until nothing changes
            jumped = flat[flat]
            if np.array_equal(jumped, flat):
                break
            flat = jumped
        new = flat.reshape(H, W)
        if np.array_equal(new, lab):
            return lab
        lab = new


# ---------------------------------------------------------------------------------------------- shapes

# Soft coverage. Blur, resampling and JPEG turn an object's edge pixels into blends of its colour with
# white; the hard map ignores or whitens them, which at 32 px erases most of a small shape. Each pixel's
# coverage α of colour c is its position on the white→c line, fitted in YCbCr with the chroma
# down-weighted (JPEG keeps luma at full resolution, chroma at half), and 0 where the pixel lies further
# than TUBE from that line. A region's mass and shape are then measured on α around it.
_YCC = np.array([[0.299, 0.587, 0.114], [-0.1687, -0.3313, 0.5], [0.5, -0.4187, -0.0813]])
_WEIGHTED = _YCC * np.sqrt(np.array([1.0, 0.25, 0.25]))[:, None]  # chroma weight 1/4
_WEIGHTED_T = _WEIGHTED.T.astype(np.float32)
FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9}  # area / d² of the ideal shapes
FIT_SIDE = 32                  # windows are block-averaged down to at most this side before fitting
FIT_BLURS = (0.0, 0.6, 1.2)    # px; the best of these explains the degradation
MAX_FIT_ERROR = 0.3            # normalised L1 misfit above which a region is no shape of this world
SHARP_IOU = 0.9                # a crisp hard mask this close to a template is classified without the soft fit
CRISP_HALO = 0.05              # crisp: the coverage outside the hard pixels is at most this fraction of them
WINDOW_MARGIN = 3              # px around a region's hard box where its blurred edges are looked for
TUBE = 35                      # coverage counts only pixels this close to the white→colour line (weighted YCbCr);
                               # wider lets the random pixels of a noise image add up to shapes


def coverage(array: np.ndarray, color: int, white: np.ndarray) -> np.ndarray:
    """(H, W) float32 coverage α of COLORS[color]: a blend a·colour + (1 − a)·white has α = a; 0 where the
    pixel is further than TUBE from that line. `white` is the image's measured background RGB."""
    w = (white - array.reshape(-1, 3).astype(np.float32)) @ _WEIGHTED_T   # (N, 3)
    line = (white - REFERENCE[color + 1]).astype(np.float32) @ _WEIGHTED_T  # (3,)
    alpha = (w @ line) / float(line @ line)
    off_line2 = (w * w).sum(1) - alpha * alpha * float(line @ line)  # squared distance from the line
    alpha = np.clip(alpha, 0.0, 1.0)
    alpha[off_line2 > TUBE * TUBE] = 0.0
    return alpha.reshape(array.shape[:2])


def background(array: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """(3,) float32 median colour of the pixels read as white: 255s on a render, a little off after a
    brightness or contrast change (where an off-white would otherwise read as a faint coverage of yellow)."""
    white = array[::2, ::2][cls[::2, ::2] == 0]  # every fourth pixel is plenty
    if len(white) < cls.size // 40:
        return np.full(3, 255, np.float32)
    return np.median(white, axis=0).astype(np.float32)


@lru_cache(maxsize=4096)
def _template(shape: str, h: int, w: int) -> np.ndarray:
    """Ideal (h, w) mask of `shape` stretched to an h×w box (the renderer's exact mask where h == w)."""
    if h == w:
        return shape_mask(shape, h)
    y, x = np.mgrid[0:h, 0:w]
    u, v = (x + 0.5) / w - 0.5, (y + 0.5) / h - 0.5  # offsets from the box centre in box units
    if shape == "circle":
        m = u * u + v * v <= 0.25
    elif shape == "square":
        m = np.ones((h, w), dtype=bool)
    elif shape == "triangle":
        m = np.abs(u) <= (y + 1) / h / 2
    else:
        m = (np.abs(u) <= 1 / 6) | (np.abs(v) <= 1 / 6)
    m.setflags(write=False)
    return m


def sharp_shape(mask: np.ndarray) -> str | None:
    """The shape a crisp region's (h, w) box mask matches with IoU >= SHARP_IOU, if any."""
    h, w = mask.shape
    if max(h, w) > MAX_ASPECT * min(h, w):
        return None
    area = int(mask.sum())
    for shape in SHAPES:
        t = _template(shape, h, w)
        inter = int(np.count_nonzero(mask & t))
        if inter >= SHARP_IOU * (area + int(t.sum()) - inter):
            return shape
    return None


def _ideal_coverage(shape: str, d: float, cx: float, cy: float, h: int, w: int, k: int = 4) -> np.ndarray:
    """(h, w) fraction of each pixel inside `shape` with box side d centred at (cx, cy), k×k samples a pixel."""
    offsets = (np.arange(k) + 0.5) / k
    u = (((np.arange(w)[:, None] + offsets).reshape(-1) - cx) / d)[None, :]  # (1, w·k) box units
    v = (((np.arange(h)[:, None] + offsets).reshape(-1) - cy) / d)[:, None]  # (h·k, 1)
    box = (np.abs(u) <= 0.5) & (np.abs(v) <= 0.5)
    if shape == "circle":
        inside = u * u + v * v <= 0.25
    elif shape == "square":
        inside = box
    elif shape == "triangle":  # apex half a pixel above the box, as the renderer's row rule gives
        inside = box & (np.abs(u) <= (v + 0.5 + 0.5 / d) / 2)
    else:
        inside = box & ((np.abs(u) <= 1 / 6) | (np.abs(v) <= 1 / 6))
    return inside.reshape(h, k, w, k).mean((1, 3))


@lru_cache(maxsize=256)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) Gaussian blur along one axis (zero outside), so blurred = G_h @ img @ G_w.T."""
    t = np.arange(n)
    g = np.exp(-((t[:, None] - t[None, :]) ** 2) / (2 * sigma * sigma))
    return g / g.sum(1, keepdims=True) if n else g


def fit_shape(alpha: np.ndarray) -> tuple[str | None, float, float, dict[str, float]]:
    """Fit the four ideal shapes to a coverage window: (best shape or None, box centre x, y, misfit per shape).

    Each shape is placed where its area matches the window's mass and its centroid the window's centroid,
    rendered as exact pixel coverage, blurred by each of FIT_BLURS; its misfit is the smallest normalised
    L1 distance Σ|α − t| / Σ(α + t). Large windows are block-averaged to FIT_SIDE first.
    """
    f = -(-max(alpha.shape) // FIT_SIDE)  # ceil
    if f > 1:
        h, w = -(-alpha.shape[0] // f) * f, -(-alpha.shape[1] // f) * f
        alpha = np.pad(alpha, ((0, h - alpha.shape[0]), (0, w - alpha.shape[1])))
        alpha = alpha.reshape(h // f, f, w // f, f).mean((1, 3))
    h, w = alpha.shape
    mass = float(alpha.sum())
    if mass <= 0:
        return None, 0.0, 0.0, {}
    px, py = alpha.sum(0) / mass, alpha.sum(1) / mass  # marginal mass along x and y
    mx, my = float(px @ (np.arange(w) + 0.5)), float(py @ (np.arange(h) + 0.5))
    vx, vy = float(px @ (np.arange(w) + 0.5 - mx) ** 2), float(py @ (np.arange(h) + 0.5 - my) ** 2)
    if max(vx, vy) > MAX_ASPECT ** 2 * min(vx, vy):  # spread along x vs y: 1 : 1.15 at most for the four
        return None, mx * f, my * f, {}
    errors, centres = {}, {}
    for shape in SHAPES:
        d = (mass / FILL[shape]) ** 0.5
        cy = my - d / 6 if shape == "triangle" else my  # a triangle's centroid sits d/6 below its box centre
        ideal = _ideal_coverage(shape, d, mx, cy, h, w)
        best = 1.0
        for sigma in FIT_BLURS:
            t = ideal if sigma == 0 else _blur_matrix(h, sigma) @ ideal @ _blur_matrix(w, sigma).T
            best = min(best, float(np.abs(alpha - t).sum()) / (mass + float(t.sum())))
        errors[shape], centres[shape] = best, (mx * f, cy * f)
    shape = min(errors, key=errors.get)
    if errors[shape] > MAX_FIT_ERROR:
        return None, mx * f, my * f, errors
    return shape, *centres[shape], errors


@dataclass(frozen=True)
class Region:
    color: str
    area: int                       # hard pixels
    mass: float                     # soft coverage around them (= area on a clean render)
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) of the hard pixels
    cx: float                       # object centre (its box centre), the spec's reference point
    cy: float
    shape: str | None
    fit: str                        # 'sharp' (template IoU) or 'soft' (coverage fit)


def find_regions(array: np.ndarray, min_mass: float) -> list[Region]:
    """Every one-colour connected region whose soft mass is at least min_mass, heaviest first."""
    H, W = array.shape[:2]
    cls = classify_pixels(array)
    lab = label_regions(cls)
    flat = lab.reshape(-1)
    colour_idx = np.flatnonzero(cls.reshape(-1) >= 1)
    if colour_idx.size == 0:
        return []
    roots, inverse, counts = np.unique(flat[colour_idx], return_inverse=True, return_counts=True)
    seed_min = max(2, int(0.1 * min_mass))
    white = background(array, cls)
    regions = []
    for k in np.flatnonzero(counts >= seed_min):
        idx = colour_idx[inverse == k]
        ys, xs = idx // W, idx % W
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        c = int(cls.reshape(-1)[roots[k]]) - 1
        m = WINDOW_MARGIN
        wx0, wy0, wx1, wy1 = max(x0 - m, 0), max(y0 - m, 0), min(x1 + m, W), min(y1 + m, H)
        window = coverage(array[wy0:wy1, wx0:wx1], c, white)
        own = lab[wy0:wy1, wx0:wx1] == roots[k]
        window[~own & (cls[wy0:wy1, wx0:wx1] >= 1)] = 0.0  # pixels of other regions are not this one's
        mass = float(window.sum())
        if mass < min_mass:
            continue
        mask = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        mask[ys - y0, xs - x0] = True
        crisp = mass - float(window[own].sum()) <= CRISP_HALO * counts[k]  # little coverage off the region
        shape = sharp_shape(mask) if crisp else None
        if shape is not None:
            fit, cx, cy = "sharp", (x0 + x1) / 2, (y0 + y1) / 2
        else:
            shape, cx, cy, _ = fit_shape(window)
            fit, cx, cy = "soft", wx0 + cx, wy0 + cy
        regions.append(Region(COLORS[c], int(counts[k]), round(mass, 1), (x0, y0, x1, y1),
                              round(cx, 2), round(cy, 2), shape, fit))
    return sorted(regions, key=lambda r: -r.mass)


@lru_cache(maxsize=None)
def spec_area(shape: str, size: str, S: int) -> int:
    """Pixels the renderer paints for `shape` at `size` on an S canvas."""
    return int(shape_mask(shape, object_size(size, S)).sum())


def _min_area(obj: NamedObject, S: int) -> float:
    return MIN_AREA_FRACTION * spec_area(obj.shape, obj.size or "small", S)


def _holds(relation: str, a: Region, b: Region) -> bool:
    """Strict comparison of the subject's (a) and object's (b) centres on the relation's axis."""
    return {"to the left of": a.cx < b.cx, "to the right of": a.cx > b.cx,
            "above": a.cy < b.cy, "below": a.cy > b.cy}[relation]


def check(image, caption: str) -> tuple[bool, dict]:
    """Does `image` (PIL image or (S, S, 3) uint8 array, S in 32/64/128/256) satisfy `caption`?

    Returns (ok, details): details has the parsed caption, every region found (dicts of Region's fields,
    heaviest first), `matched` (indices into regions, one per named object, where found) and, when ok
    is False, a one-line `reason`.
    """
    array = _as_array(image)
    S = array.shape[0]
    parsed = parse_caption(caption)
    if parsed is None:
        return False, {"caption": caption, "reason": "not a shapes-world caption"}
    # The smallest region that could matter: 40% of the smallest small object (for the second-object rule).
    floor = MIN_AREA_FRACTION * min(spec_area(s, "small", S) for s in SHAPES)
    regions = find_regions(array, floor)
    details = {"caption": caption, "parsed": {"objects": [dict(vars(o)) for o in parsed.objects],
                                              "relation": parsed.relation, "template": parsed.template},
               "regions": [dict(vars(r)) for r in regions]}

    def fail(reason: str) -> tuple[bool, dict]:
        details["reason"] = reason
        return False, details

    candidates = []  # per named object, the indices of regions that qualify
    for obj in parsed.objects:
        found = [i for i, r in enumerate(regions) if r.color == obj.color and r.shape == obj.shape
                 and r.mass >= _min_area(obj, S)]
        if not found:
            near = sum(r.color == obj.color for r in regions)
            return fail(f"no {obj.color} {obj.shape} of plausible size" + (
                f" ({near} {obj.color} region(s) of another shape or too small)" if near
                else f" (no {obj.color} region)"))
        candidates.append(found)

    if len(parsed.objects) == 1:
        details["matched"] = [candidates[0][0]]
        others = [r for i, r in enumerate(regions) if i != candidates[0][0]]
        if others:
            return fail(f"a second object is present ({others[0].color}, {others[0].mass:.0f} px)")
        return True, details

    details["matched"] = [candidates[0][0], candidates[1][0]]
    if parsed.relation is None:
        return True, details
    for i in candidates[0]:
        for j in candidates[1]:
            if _holds(parsed.relation, regions[i], regions[j]):
                details["matched"] = [i, j]
                return True, details
    a, b = regions[candidates[0][0]], regions[candidates[1][0]]
    return fail(f"relation '{parsed.relation}' does not hold: centres ({a.cx}, {a.cy}) vs ({b.cx}, {b.cy})")
