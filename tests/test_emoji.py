"""The built-in emoji source: renders, captions, keys, options, missing-font errors."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from PIL import Image, ImageFont

from dallecli.console import UserError
from dallecli.data import emoji as em


@pytest.fixture(scope="module")
def font() -> Path:
    try:
        return em.find_font()
    except UserError as e:
        pytest.skip(f"Noto Color Emoji is not installed (apt-get install fonts-noto-color-emoji): {e}")


def first(n: int, **kwargs) -> list[tuple[str, Image.Image, str, dict]]:
    return list(itertools.islice(em.iter_emoji(**kwargs), n))


def test_renders_rgb_square_on_white_with_the_glyph_in_the_middle(font):
    for key, image, caption, meta in first(6, size=32):
        assert image.mode == "RGB" and image.size == (32, 32)
        for corner in [(0, 0), (31, 0), (0, 31), (31, 31)]:
            assert min(image.getpixel(corner)) >= 250, (key, corner)
        centre = image.crop((8, 8, 24, 24))
        assert min(min(px) for px in centre.getdata()) < 200, key
        assert meta["source"] == "emoji" and meta["codepoints"] and meta["name"]


def test_known_emoji_caption_key_and_meta(font):
    apple = next(e for e in em.scan_emoji().items if e.text == "\U0001F34E")
    assert (apple.key, apple.caption) == ("emoji-1f34e", "red apple")
    assert apple.meta()["codepoints"] == ["1f34e"]
    family = next(e for e in em.scan_emoji().items if e.key == "emoji-1f468_200d_1f469_200d_1f467")
    assert family.caption == "family man woman girl"


def test_captions_lower_case_and_keys_unique_filename_safe_sorted(font):
    items = em.scan_emoji().items
    keys = [e.key for e in items]
    assert len(set(keys)) == len(keys) == len(items) > 1000
    assert keys == sorted(keys)
    for e in items:
        assert e.caption and e.caption == e.caption.lower() and e.caption.isascii(), e.key
        assert e.key.startswith("emoji-") and "." not in e.key and all(c.isalnum() or c in "-_" for c in e.key)


def test_keys_and_pixels_stable_across_calls(font):
    fresh = em.scan_emoji.__wrapped__  # bypass the per-process cache
    assert [e.key for e in fresh().items] == [e.key for e in fresh().items]
    a, b = first(4, size=24), first(4, size=24)
    assert [(k, c) for k, _, c, _ in a] == [(k, c) for k, _, c, _ in b]
    assert all(x[1].tobytes() == y[1].tobytes() for x, y in zip(a, b))


def test_options_add_skin_tones_and_flags(font):
    default = em.scan_emoji()
    tones, flags = em.scan_emoji(skin_tones=True), em.scan_emoji(flags=True)
    assert len(tones.items) > len(default.items) and len(flags.items) > len(default.items)
    in_default = {e.key for e in default.items}
    assert in_default < {e.key for e in tones.items} and in_default < {e.key for e in flags.items}
    for e in default.items:  # no modifiers, no regional indicators or tags by default
        assert not any(ord(c) in em.SKIN_TONES or ord(c) in em.REGIONAL_INDICATORS or ord(c) in em.TAGS
                       for c in e.text), e.key
    japan = next(e for e in flags.items if e.key == "emoji-1f1ef_1f1f5")
    assert japan.caption == "flag japan" and japan.is_flag
    assert "emoji-1f44d_1f3fd" in {e.key for e in tones.items}  # thumbs up: medium skin tone


def test_without_complex_layout_sequences_are_skipped_not_drawn_side_by_side(font):
    basic = em.scan_emoji(layout=ImageFont.Layout.BASIC)
    assert 0 < len(basic.items) < len(em.scan_emoji().items)
    assert all(len(e.drawn) == 1 for e in basic.items)  # FE0F dropped where that draws; no ZWJ, no keycaps
    assert "emoji-1f468_200d_1f469_200d_1f467" in dict(basic.skipped)
    glyph = em.render_emoji("\u2764\ufe0f", 16, layout=ImageFont.Layout.BASIC)  # red heart, FE0F as a glyph
    assert glyph.size == (16, 16)


def test_a_codepoint_the_font_lacks_is_not_drawn(font):
    check = em._GlyphCheck(em.load_font(font))
    assert check.why_not("\U0010FFFD") is not None
    assert check.why_not("\U0001F34E") is None
    with pytest.raises(ValueError):
        em.render_emoji("\U0010FFFD", 16)


def test_missing_font_path_is_a_one_line_user_error(tmp_path):
    with pytest.raises(UserError) as e:
        em.find_font(tmp_path / "nope.ttf")
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "nope.ttf") in message
    assert "sudo apt-get install fonts-noto-color-emoji" in message and "--font PATH" in message


def test_no_font_anywhere_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(em, "STANDARD_LOCATIONS", (tmp_path / "a" / em.FONT_FILE,))
    monkeypatch.setattr(em, "_fc_match", lambda: None)
    with pytest.raises(UserError) as e:
        em.find_font()
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "a") in message and "fonts-noto-color-emoji" in message


def test_caption_cleanup():
    assert em.caption_for(":red_apple:") == "red apple"
    assert em.caption_for(":Côte_d’Ivoire:", is_flag=True) == "flag cote d'ivoire"
    assert em.caption_for(":keycap_#:") == "keycap #"
    assert em.caption_for(":OK_hand_medium-dark_skin_tone:") == "ok hand medium-dark skin tone"
