"""The shapes-world renderer against /work/shared/specs/shapes-world.md."""

import hashlib
import json
import io
from collections import Counter

import numpy as np
import pytest

from dallecli.data.shapes import (COLORS, HELD_OUT, MARGIN, PALETTE, RELATIONS, SEEN_PAIRS, SHAPES, SPLITS,
                                  SUPPORTED_SIZES, TEMPLATES, iter_scenes, object_size, render_scene, shape_mask)


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def box(obj) -> tuple[int, int, int, int]:
    """x0, y0, x1, y1 (exclusive) of an object's d×d box from its recorded centre."""
    x0, y0 = obj["cx"] - obj["d"] / 2, obj["cy"] - obj["d"] / 2
    assert x0 == int(x0) and y0 == int(y0)
    return int(x0), int(y0), int(x0) + obj["d"], int(y0) + obj["d"]


def test_object_sizes_follow_the_spec():
    assert {S: tuple(object_size(z, S) for z in ("small", "medium", "large")) for S in SUPPORTED_SIZES} == {
        32: (7, 9, 13), 64: (14, 18, 26), 128: (28, 36, 51), 256: (56, 72, 102)}
    with pytest.raises(ValueError, match="not supported"):
        object_size("small", 48)
    with pytest.raises(ValueError, match="unknown object size"):
        object_size("huge", 64)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="canvas size 100"):
        render_scene(0, 0, 100)
    with pytest.raises(ValueError, match="unknown shapes split"):
        render_scene(0, 0, 64, "test")
    with pytest.raises(ValueError, match=">= 0"):
        render_scene(0, -1, 64)


def test_constants():
    assert len(PALETTE) == 6 and len(SHAPES) == 4 and len(SEEN_PAIRS) == 20
    assert HELD_OUT == {("red", "triangle"), ("green", "square"), ("blue", "cross"), ("yellow", "circle")}
    assert RELATIONS == ("to the left of", "to the right of", "above", "below")


@pytest.mark.parametrize("d", [7, 9, 13, 14, 18, 26, 28, 36, 51, 56, 72, 102])
def test_shape_masks_fill_their_box(d):
    for shape in SHAPES:
        m = shape_mask(shape, d)
        assert m.shape == (d, d)
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        assert (rows[0], rows[-1], cols[0], cols[-1]) == (0, d - 1, 0, d - 1), shape  # box exactly d×d
        assert np.array_equal(m, m[:, ::-1]) or shape == "cross", shape  # left–right symmetric
    circle = shape_mask("circle", d)
    assert np.array_equal(circle, circle.T) and np.array_equal(circle, circle[::-1])
    assert abs(circle.sum() / (np.pi * d * d / 4) - 1) < 0.12
    widths = shape_mask("triangle", d).sum(1)
    assert widths[-1] == d and widths[0] <= 2 and np.all(np.diff(widths) >= 0)  # apex top, base bottom
    cross, t = shape_mask("cross", d), round(d / 3)
    assert cross.all(1).sum() == t and cross.all(0).sum() == t  # two bars of thickness round(d/3)
    assert not cross[0, 0] and not cross[-1, -1]


def test_same_arguments_same_bytes_and_golden_values():
    for args in [(0, 3, 64, "train"), (5, 17, 32, "test-zeroshot")]:
        a, b = render_scene(*args), render_scene(*args)
        assert png_bytes(a[0]) == png_bytes(b[0]) and a[1:] == b[1:]
    # Pinned pixels and captions: a change here changes every data set built from this world.
    golden = {
        (0, 0, 64, "train"): ("a blue square and a yellow square", "264962a3420b2424"),
        (0, 1, 32, "train"): ("a red square below a cyan cross", "0e19e5b21d3244bc"),
        (7, 123, 128, "test-zeroshot"): ("a small blue cross", "f6ba335ba6c90a0d"),
        (1, 5, 256, "val"): ("a cyan cross above a blue triangle", "e6594133f022d57c"),
        (2, 9, 64, "test-seen"): ("a purple circle", "d91cf18d8e441c33"),
    }
    for args, (caption, digest) in golden.items():
        image, got, meta = render_scene(*args)
        assert got == caption
        assert hashlib.sha256(np.asarray(image).tobytes()).hexdigest()[:16] == digest, args
        assert meta["split"] == args[3]


def test_different_index_seed_or_split_gives_a_different_scene():
    base = render_scene(0, 0, 64, "train")
    for other in [render_scene(0, 1, 64, "train"), render_scene(1, 0, 64, "train"),
                  render_scene(0, 0, 64, "test-seen")]:
        assert png_bytes(other[0]) != png_bytes(base[0])
    pngs = {png_bytes(render_scene(0, i, 64, "train")[0]) for i in range(50)}
    assert len(pngs) == 50


def test_caption_does_not_depend_on_canvas_size():
    for i in range(20):
        captions = {render_scene(3, i, S, "train")[1] for S in SUPPORTED_SIZES}
        assert len(captions) == 1


def repaint(meta, S) -> np.ndarray:
    """An independent re-rendering of a scene from its metadata."""
    canvas = np.full((S, S, 3), 255, np.uint8)
    for obj in meta["objects"]:
        x0, y0, x1, y1 = box(obj)
        canvas[y0:y1, x0:x1][shape_mask(obj["shape"], obj["d"])] = PALETTE[obj["color"]]
    return canvas


def caption_of(meta) -> str:
    o = meta["objects"]
    if len(o) == 1:
        return TEMPLATES[meta["template"]].format(c=o[0]["color"], s=o[0]["shape"], z=o[0]["size"])
    return TEMPLATES[meta["template"]].format(c1=o[0]["color"], s1=o[0]["shape"], r=meta["relation"],
                                             c2=o[1]["color"], s2=o[1]["shape"])


@pytest.mark.parametrize("S", SUPPORTED_SIZES)
def test_scenes_conform_to_the_spec(S):
    colours = {(255, 255, 255)} | set(PALETTE.values())
    n = 120 if S <= 64 else 40
    for i in range(n):
        split = SPLITS[i % len(SPLITS)]
        image, caption, meta = render_scene(4, i, S, split)
        array = np.asarray(image)
        assert image.mode == "RGB" and array.shape == (S, S, 3)
        packed = np.unique(array.reshape(-1, 3).astype(np.int32) @ np.array([65536, 256, 1]))
        assert {(int(v) >> 16, int(v) >> 8 & 255, int(v) & 255) for v in packed} <= colours  # no anti-aliasing
        assert np.array_equal(array, repaint(meta, S))  # exactly the recorded objects, nothing else
        assert caption == caption_of(meta)
        assert json.loads(json.dumps(meta)) == meta
        objects = meta["objects"]
        for obj in objects:
            x0, y0, x1, y1 = box(obj)
            assert obj["d"] == object_size(obj["size"], S)
            assert x0 >= MARGIN and y0 >= MARGIN and x1 <= S - MARGIN and y1 <= S - MARGIN
        if len(objects) == 1:
            assert objects[0]["size"] in ("small", "large") and meta["relation"] is None
            assert meta["template"] in range(5)
            continue
        a, b = objects
        assert a["size"] == b["size"] == "medium" and meta["template"] in (5, 6)
        assert (a["color"], a["shape"]) != (b["color"], b["shape"])
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = box(a), box(b)
        assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0  # boxes do not overlap
        dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
        horizontal = abs(dx) >= 0.40 * S and abs(dy) <= 0.12 * S
        vertical = abs(dy) >= 0.40 * S and abs(dx) <= 0.12 * S
        assert horizontal or vertical  # the "and" template too
        relation = meta["relation"]
        if relation == "to the left of":
            assert horizontal and dx < 0
        elif relation == "to the right of":
            assert horizontal and dx > 0
        elif relation == "above":
            assert vertical and dy < 0
        elif relation == "below":
            assert vertical and dy > 0
        else:
            assert meta["template"] == 6


def test_held_out_pairs_never_in_train_and_seen_pairs_all_present():
    pairs, kinds, relations, templates = Counter(), Counter(), Counter(), Counter()
    for _, _, _, meta in iter_scenes("train", 2000, seed=0, size=32):
        pairs.update((o["color"], o["shape"]) for o in meta["objects"])
        kinds[len(meta["objects"])] += 1
        relations[meta["relation"]] += 1
        templates[meta["template"]] += 1
    assert not set(pairs) & HELD_OUT
    assert set(pairs) == set(SEEN_PAIRS)  # every colour and every shape, with all their seen partners
    assert {c for c, _ in pairs} == set(COLORS) and {s for _, s in pairs} == set(SHAPES)
    assert 900 <= kinds[1] <= 1100 and 900 <= kinds[2] <= 1100  # half one-object, half two-object
    assert set(relations) == set(RELATIONS) | {None} and set(templates) == set(range(len(TEMPLATES)))


def test_zeroshot_scenes_always_hold_out_and_other_splits_never():
    for split in SPLITS:
        for _, _, caption, meta in iter_scenes(split, 300, seed=1, size=32):
            held = [(o["color"], o["shape"]) in HELD_OUT for o in meta["objects"]]
            assert any(held) if split == "test-zeroshot" else not any(held), (split, caption)


def test_iter_scenes_keys_and_content():
    items = list(iter_scenes("test-seen", 3, seed=2, size=32, start=10))
    assert [k for k, *_ in items] == ["shapes-test-seen-0000010", "shapes-test-seen-0000011",
                                      "shapes-test-seen-0000012"]
    image, caption, meta = render_scene(2, 11, 32, "test-seen")
    assert items[1][2] == caption and items[1][3] == meta
    assert np.array_equal(np.asarray(items[1][1]), np.asarray(image))


def test_one_or_two_objects_on_request():
    assert all(len(render_scene(0, i, 32, two_object_fraction=0.0)[2]["objects"]) == 1 for i in range(30))
    assert all(len(render_scene(0, i, 32, two_object_fraction=1.0)[2]["objects"]) == 2 for i in range(30))
