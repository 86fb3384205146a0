"""The shapes-world checker: parsing, pieces, and the validation rates the project requires."""

from collections import deque

import numpy as np
import pytest
from PIL import Image

from dallecli.data.shapes import PALETTE, SPLITS, SUPPORTED_SIZES, render_scene, shape_mask
from dallecli.evaluate.shapes_check import NamedObject, category, check, classify_pixels, label_regions, parse_caption
from dallecli.evaluate.shapes_validate import DEGRADATIONS, altered_caption, degrade, validate


def scenes(n, seed, sizes=SUPPORTED_SIZES):
    """n scenes, splits and sizes cycled (fewer at 256 px, which is slowest to check)."""
    for i in range(n):
        S = sizes[(i // len(SPLITS)) % len(sizes)]
        yield render_scene(seed, i, S, SPLITS[i % len(SPLITS)])


def canvas(S, *objects):
    """A white S×S canvas with (colour, shape, d, x0, y0) objects painted on it."""
    array = np.full((S, S, 3), 255, np.uint8)
    for color, shape, d, x0, y0 in objects:
        array[y0:y0 + d, x0:x0 + d][shape_mask(shape, d)] = PALETTE[color]
    return array


# --------------------------------------------------------------------------------------------- captions

def test_parse_every_template():
    p = parse_caption("a small red circle")
    assert p.objects == (NamedObject("red", "circle", "small"),) and p.relation is None and p.template == 1
    for k, text in enumerate(["a blue cross", "a large blue cross", "one blue cross", "a picture of a blue cross",
                              "a blue cross on a white background"]):
        p = parse_caption(text)
        assert p.template == k and p.objects[0].color == "blue" and p.objects[0].shape == "cross"
    p = parse_caption("a red circle to the right of a green square")
    assert p.objects == (NamedObject("red", "circle", "medium"), NamedObject("green", "square", "medium"))
    assert p.relation == "to the right of" and p.template == 5
    p = parse_caption("  A Yellow Triangle and a cyan circle. ")
    assert p.relation is None and p.template == 6 and p.objects[1] == NamedObject("cyan", "circle", "medium")


@pytest.mark.parametrize("text", ["", "a red", "a pink circle", "a red hexagon", "two red circles",
                                  "a medium red circle", "a red circle near a blue square",
                                  "a red circle above a red circle", "a red circle above"])
def test_parse_refuses_what_the_world_never_says(text):
    assert parse_caption(text) is None


def test_every_rendered_caption_parses_back_to_its_meta():
    for image, caption, meta in scenes(200, 0, sizes=(32,)):
        p = parse_caption(caption)
        assert [(o.color, o.shape) for o in p.objects] == [(o["color"], o["shape"]) for o in meta["objects"]]
        assert p.relation == meta["relation"] and p.template == meta["template"]


def test_category():
    assert category("a red circle") == "seen_single"
    assert category("one red triangle") == "zeroshot_single"
    assert category("a red circle above a blue square") == "relation_seen"
    assert category("a red circle and a blue cross") == "relation_zeroshot"
    assert category("a yellow circle to the left of a blue square") == "relation_zeroshot"
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        category("a dog")


# --------------------------------------------------------------------------------------------- pieces

def flood_fill_count(cls):
    """Reference: number of 4-connected same-colour regions (cls >= 1), by breadth-first search."""
    H, W = cls.shape
    seen = np.zeros_like(cls, dtype=bool)
    regions = 0
    for y in range(H):
        for x in range(W):
            if cls[y, x] < 1 or seen[y, x]:
                continue
            regions += 1
            queue = deque([(y, x)])
            seen[y, x] = True
            while queue:
                a, b = queue.popleft()
                for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                    if 0 <= c < H and 0 <= d < W and not seen[c, d] and cls[c, d] == cls[y, x]:
                        seen[c, d] = True
                        queue.append((c, d))
    return regions


def test_label_regions_matches_flood_fill():
    rng = np.random.default_rng(0)
    for density in (0.3, 0.6, 0.9):
        cls = np.where(rng.random((32, 32)) < density, rng.integers(1, 3, (32, 32)), 0).astype(np.int8)
        lab = label_regions(cls)
        assert len(np.unique(lab[cls >= 1])) == flood_fill_count(cls)
        same_h = (cls[:, 1:] == cls[:, :-1]) & (cls[:, 1:] >= 1)
        same_v = (cls[1:, :] == cls[:-1, :]) & (cls[1:, :] >= 1)
        assert np.all(lab[:, 1:][same_h] == lab[:, :-1][same_h])  # joined neighbours share a label
        assert np.all(lab[1:, :][same_v] == lab[:-1, :][same_v])
        for label in np.unique(lab[cls >= 1]):
            assert len(np.unique(cls[lab == label])) == 1  # one colour per region
    spiral = np.zeros((9, 9), np.int8)
    spiral[0, :] = spiral[:, 8] = spiral[8, :] = spiral[2:, 0] = spiral[2, :7] = spiral[2:7, 6] = 1
    assert len(np.unique(label_regions(spiral)[spiral >= 1])) == flood_fill_count(spiral) == 1


def test_classify_pixels():
    array = np.array([[[255, 255, 255], [230, 25, 25], [0, 190, 200]],
                      [[250, 245, 255], [35, 75, 220], [128, 128, 128]]], np.uint8)
    assert classify_pixels(array).tolist() == [[0, 1, 6], [0, 3, -1]]


# --------------------------------------------------------------------------------------------- decisions

def test_hand_made_scenes():
    S = 64
    red_circle = ("red", "circle", 18, 6, 20)
    blue_square = ("blue", "square", 18, 40, 22)
    two = canvas(S, red_circle, blue_square)
    assert check(two, "a red circle to the left of a blue square")[0]
    assert check(two, "a blue square to the right of a red circle")[0]
    assert check(two, "a red circle and a blue square")[0]
    ok, why = check(two, "a red circle to the right of a blue square")
    assert not ok and "relation" in why["reason"]
    assert check(two, "a red circle above a blue square")[0]  # centres' y 29 < 31: strict, on that axis only
    ok, why = check(two, "a red circle")
    assert not ok and "second object" in why["reason"]  # one-object caption, two objects
    one = canvas(S, ("red", "circle", 26, 20, 20))
    assert check(one, "a large red circle")[0] and check(one, "a red circle")[0]
    ok, why = check(canvas(S, ("red", "circle", 14, 20, 20)), "a large red circle")
    assert not ok and "plausible size" in why["reason"]  # small is < 40% of large
    assert not check(one, "a red square")[0] and not check(one, "a blue circle")[0]
    assert check(Image.fromarray(one), "a red circle")[0]  # PIL images too
    bar = np.full((S, S, 3), 255, np.uint8)
    bar[20:34, 10:50] = PALETTE["green"]  # a 40×14 bar is no square
    ok, why = check(bar, "a green square")
    assert not ok and why["regions"][0]["shape"] is None


def test_centres_compare_strictly():
    # Same column: neither left of nor right of.
    image = canvas(64, ("red", "circle", 18, 20, 4), ("blue", "square", 18, 20, 40))
    assert check(image, "a red circle above a blue square")[0]
    assert not check(image, "a red circle to the left of a blue square")[0]
    assert not check(image, "a red circle to the right of a blue square")[0]


def test_bad_inputs():
    with pytest.raises(ValueError, match="square RGB image"):
        check(np.zeros((48, 48, 3), np.uint8), "a red circle")
    with pytest.raises(ValueError, match="uint8"):
        check(np.zeros((64, 64, 3), np.float32), "a red circle")
    ok, why = check(np.full((64, 64, 3), 255, np.uint8), "a dog on a skateboard")
    assert not ok and why["reason"] == "not a shapes-world caption"


# --------------------------------------------------------------------------------------------- rates

def test_clean_renders_are_accepted():
    results = [check(image, caption) for image, caption, _ in scenes(240, 1)]
    failures = [why for ok, why in results if not ok]
    assert len(failures) <= 0.005 * len(results), failures[:3]


def test_degraded_renders_are_accepted():
    rng = np.random.default_rng(0)
    results = []
    for i, (image, caption, _) in enumerate(scenes(200, 2)):
        results.append(check(degrade(image, DEGRADATIONS[i % len(DEGRADATIONS)], rng), caption))
    failures = [why for ok, why in results if not ok]
    assert len(failures) <= 0.03 * len(results), failures[:3]


def test_altered_captions_are_refused():
    rng = np.random.default_rng(0)
    accepted = []
    for image, caption, meta in scenes(240, 3):
        false, change = altered_caption(caption, meta, rng)
        assert false != caption and parse_caption(false) is not None
        if check(image, false)[0]:
            accepted.append((caption, false))
    assert len(accepted) <= 0.02 * 240, accepted[:3]


def test_blank_and_noise_images_are_refused():
    rng = np.random.default_rng(0)
    for image, caption, _ in scenes(80, 4):
        S = image.width
        assert not check(np.full((S, S, 3), 255, np.uint8), caption)[0]
        assert not check(rng.integers(0, 256, (S, S, 3), dtype=np.uint8), caption)[0], caption


def test_altered_caption_changes_exactly_one_thing():
    rng = np.random.default_rng(1)
    for image, caption, meta in scenes(60, 5, sizes=(32,)):
        false, change = altered_caption(caption, meta, rng)
        a, b = parse_caption(caption), parse_caption(false)
        assert a.template == b.template == meta["template"]
        if change == "relation":
            assert a.objects == b.objects and a.relation != b.relation
        else:
            assert a.relation == b.relation
            assert sum(x != y for x, y in zip(a.objects, b.objects)) == 1


def test_validate_reports_the_four_rates():
    report = validate(8, seed=0, sizes=(32,))
    for key in ("clean_accuracy", "degraded_accuracy", "false_accept_rate", "blank_accept_rate",
                "noise_accept_rate"):
        assert 0.0 <= report[key] <= 1.0
    assert report["n"] == 8 and set(report["degraded_by_kind"]) == set(DEGRADATIONS)


@pytest.mark.slow
def test_validation_meets_the_project_thresholds():
    report = validate(1000, seed=0)
    assert report["clean_accuracy"] >= 0.995
    assert report["degraded_accuracy"] >= 0.97
    assert report["false_accept_rate"] <= 0.02
    assert report["blank_accept_rate"] == 0.0 and report["noise_accept_rate"] == 0.0
