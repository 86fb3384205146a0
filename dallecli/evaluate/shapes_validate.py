"""How well the shapes checker (`shapes_check.check`) judges: renders from the shapes world, clean and with
realistic corruptions, against their true captions and against altered ones (spec:
/work/shared/specs/shapes-world.md, "Checking"). `validate(n, seed)` is the whole measurement; `degrade` and
`altered_caption` are its two ingredients, also used by the tests.
"""

from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from dallecli.data.shapes import OPPOSITE, SHAPES, SPLITS, SUPPORTED_SIZES, TEMPLATES, render_scene
from dallecli.evaluate.shapes_check import COLORS, check

DEGRADATIONS = ("blur", "jitter", "noise", "jpeg", "resample")


def degrade(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """One realistic corruption of a clean render, for measuring the checker's robustness.

    blur: Gaussian, radius U(0.5, 1); jitter: brightness, contrast and saturation each ×U(0.95, 1.05);
    noise: Gaussian σ = 8; jpeg: quality 75; resample: bilinear down ×2 then back up.
    """
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.0))))
    if kind == "jitter":
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            image = enhance(image).enhance(float(rng.uniform(0.95, 1.05)))
        return image
    if kind == "noise":
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 8.0, (image.height, image.width, 3))
        return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
    if kind == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=75)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if kind == "resample":
        S = image.width
        return image.resize((S // 2, S // 2), Image.BILINEAR).resize((S, S), Image.BILINEAR)
    raise ValueError(f"unknown degradation {kind!r}; expected one of {DEGRADATIONS}")


def altered_caption(caption: str, meta: dict, rng: np.random.Generator) -> tuple[str, str]:
    """A caption that is false for the scene `meta` describes: one object's colour or shape changed, or the
    relation reversed. Returns (caption, what changed)."""
    objects = [dict(o) for o in meta["objects"]]
    changes = ["color", "shape"] + (["relation"] if meta["relation"] is not None else [])
    change = changes[int(rng.integers(len(changes)))]
    relation = meta["relation"]
    if change == "relation":
        relation = OPPOSITE[relation]
    else:
        i = int(rng.integers(len(objects)))
        taken = {(o["color"], o["shape"]) for j, o in enumerate(objects) if j != i}
        pool = COLORS if change == "color" else SHAPES
        options = [v for v in pool if v != objects[i][change]
                   and ((v, objects[i]["shape"]) if change == "color" else (objects[i]["color"], v)) not in taken]
        objects[i][change] = options[int(rng.integers(len(options)))]
    first = objects[0]
    fields = dict(c=first["color"], s=first["shape"], z=first["size"], c1=first["color"], s1=first["shape"],
                  r=relation)
    if len(objects) == 2:
        fields.update(c2=objects[1]["color"], s2=objects[1]["shape"])
    return TEMPLATES[meta["template"]].format(**fields), change


def validate(n: int = 1000, seed: int = 0, sizes: tuple[int, ...] = SUPPORTED_SIZES) -> dict:
    """Measure the checker on n rendered scenes (splits and sizes cycled): accuracy on clean renders, on
    degraded renders (one corruption each, cycled), false accepts on altered captions (on the clean and
    the degraded image), accuracy with all five corruptions chained (informative: at 32 px this leaves
    small objects a few pixels of signal), and accepts on blank white and uniform-noise images given the
    true captions.
    Rates are fractions in [0, 1]; clean_images_per_second times check() alone over the sizes used."""
    rng = np.random.default_rng(seed)
    tally = {k: [0, 0] for k in ("clean", "degraded", "false_accept", "degraded_false_accept",
                                 "combined", "blank_accept", "noise_accept")}
    per_kind = {k: [0, 0] for k in DEGRADATIONS}
    per_size = {S: [0, 0] for S in sizes}
    per_change = {k: [0, 0] for k in ("color", "shape", "relation")}
    failures = []
    checked, seconds = 0, 0.0

    def count(name, ok, bucket=None):
        tally[name][0] += int(ok)
        tally[name][1] += 1
        if bucket is not None:
            bucket[0] += int(ok)
            bucket[1] += 1

    for i in range(n):
        split, S = SPLITS[i % len(SPLITS)], sizes[(i // len(SPLITS)) % len(sizes)]
        image, caption, meta = render_scene(seed, i, S, split)
        t = time.perf_counter()
        ok, why = check(image, caption)
        seconds += time.perf_counter() - t
        checked += 1
        count("clean", ok)
        if not ok and len(failures) < 20:
            failures.append({"index": i, "split": split, "size": S, "caption": caption,
                             "reason": why.get("reason")})
        kind = DEGRADATIONS[i % len(DEGRADATIONS)]
        degraded = degrade(image, kind, rng)
        ok, why = check(degraded, caption)
        count("degraded", ok, per_kind[kind])
        per_size[S][0] += int(ok)
        per_size[S][1] += 1
        false_caption, change = altered_caption(caption, meta, rng)
        count("false_accept", check(image, false_caption)[0], per_change[change])
        count("degraded_false_accept", check(degraded, false_caption)[0])
        for kind in DEGRADATIONS:  # all five in a row: far harsher than any one
            image = degrade(image, kind, rng)
        count("combined", check(image, caption)[0])
        count("blank_accept", check(np.full((S, S, 3), 255, np.uint8), caption)[0])
        count("noise_accept", check(rng.integers(0, 256, (S, S, 3), dtype=np.uint8), caption)[0])

    def rate(pair):
        return pair[0] / max(pair[1], 1)

    return {
        "n": n, "seed": seed, "sizes": list(sizes),
        "clean_accuracy": rate(tally["clean"]),
        "degraded_accuracy": rate(tally["degraded"]),
        "false_accept_rate": rate(tally["false_accept"]),
        "degraded_false_accept_rate": rate(tally["degraded_false_accept"]),
        "combined_degradation_accuracy": rate(tally["combined"]),
        "blank_accept_rate": rate(tally["blank_accept"]),
        "noise_accept_rate": rate(tally["noise_accept"]),
        "degraded_by_kind": {k: rate(v) for k, v in per_kind.items()},
        "degraded_by_size": {S: rate(v) for S, v in per_size.items()},
        "false_accept_by_change": {k: rate(v) for k, v in per_change.items()},
        "clean_images_per_second": checked / max(seconds, 1e-9),
        "clean_failures": failures,
    }
