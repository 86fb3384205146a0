"""The built-in emoji data source: every emoji the Noto Color Emoji font draws, captioned with its CLDR name.

    for key, image, caption, meta in iter_emoji(size=64):
        ...  # "emoji-1f34e", <PIL RGB 64x64 on white>, "red apple", {"source": "emoji", ...}

What is in the set
- Emoji: the fully-qualified entries of `emoji.EMOJI_DATA` (one per emoji; the minimally-qualified and
  unqualified spellings of the same emoji and the 9 "component" entries, skin-tone swatches and hair
  pieces, are left out).
- Skin-tone variants (any modifier U+1F3FB..U+1F3FF) only with `skin_tones=True`; flags (regional-indicator
  pairs such as 🇯🇵 and tag sequences such as 🏴 England) only with `flags=True`. Other flag-like emoji
  (🏁 🚩 🏳️‍🌈 🏴‍☠️) are ordinary emoji and always in.
- Only what the font draws as one glyph: a sequence whose glyph is missing (.notdef, drawn empty in Noto,
  or pixel-equal to the font's .notdef), which falls apart into several glyphs side by side (a ZWJ
  sequence, flag or skin tone the font has no ligature for, or any sequence when Pillow lacks libraqm), or
  which draws pixel-for-pixel as its first codepoint alone (tag flags without libraqm: 🏴 plus invisible
  tags; Noto's five 🏂 skin tones, whose goggles hide the face: a caption the image cannot show) is
  skipped; `scan_emoji(...).skipped` says which and why. Emoji newer than the font (Noto 2.042 stops at
  Emoji 15.1) are skipped that way.

Captions (`caption_for`): the name from the `emoji` package without colons, underscores to spaces, curly
quotes to ASCII, accents folded to ASCII ("curaçao" -> "curacao"), lower-case; flags get a "flag " prefix
("flag japan", "flag england"), as the CLDR name "flag: Japan" reads. meta["name"] keeps the name as the
package spells it ("Curaçao"). The emoji package carries no CLDR group, so meta has no "group".

Keys are "emoji-" + the codepoints of the fully-qualified sequence in lower-case hex joined by "_"
("emoji-2764_fe0f", "emoji-1f468_200d_1f469_200d_1f467"): stable, filename-safe, free of dots.
"""
from __future__ import annotations

import functools
import hashlib
import shutil
import subprocess
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image, ImageDraw, ImageFont, features

from dallecli.console import UserError

FONT_FILE = "NotoColorEmoji.ttf"
FONT_FAMILY = "Noto Color Emoji"
STANDARD_LOCATIONS = (  # Debian/Ubuntu, Arch, Fedora, then per-user and local installs
    Path("/usr/share/fonts/truetype/noto") / FONT_FILE,
    Path("/usr/share/fonts/noto") / FONT_FILE,
    Path("/usr/share/fonts/google-noto-color-emoji") / FONT_FILE,
    Path("/usr/local/share/fonts") / FONT_FILE,
    Path("~/.local/share/fonts").expanduser() / FONT_FILE,
    Path("~/.fonts").expanduser() / FONT_FILE,
)
INSTALL_HINT = "install it with `sudo apt-get install fonts-noto-color-emoji` or pass `--font PATH`"

STRIKE_SIZE = 109  # the one bitmap strike in Noto's CBDT table: FreeType refuses any other size
MARGIN = 0.04  # white border on each side of the square, as a fraction of the glyph's longer side
REFERENCE = "\U0001F600"  # 😀: one glyph wide, to tell one glyph from several
MISSING = "\U0010FFFD"  # a private-use codepoint no emoji font maps: draws as the font's .notdef
FE0F = "\uFE0F"  # emoji presentation selector

SKIN_TONES = range(0x1F3FB, 0x1F3FF + 1)
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F1FF + 1)
TAGS = range(0xE0020, 0xE007F + 1)


@dataclass(frozen=True)
class Emoji:
    key: str  # "emoji-1f34e"
    text: str  # the fully-qualified sequence
    drawn: str  # what is drawn: `text`, or `text` without U+FE0F where only that is one glyph
    caption: str  # "red apple"
    name: str  # the emoji package's name, colons stripped, underscores to spaces: "red apple", "Curaçao"
    version: float  # the Emoji version that added it
    is_flag: bool

    @property
    def codepoints(self) -> list[str]:
        return [f"{ord(c):04x}" for c in self.text]

    def meta(self) -> dict:
        return {"source": "emoji", "codepoints": self.codepoints, "name": self.name, "emoji": self.text,
                "emoji_version": self.version}


@dataclass(frozen=True)
class EmojiSet:
    items: tuple[Emoji, ...]  # sorted by key
    skipped: tuple[tuple[str, str], ...]  # (key, reason), sorted by key
    font: Path


def emoji_key(text: str) -> str:
    return "emoji-" + "_".join(f"{ord(c):04x}" for c in text)


def caption_for(name: str, is_flag: bool = False) -> str:
    """':Côte_d’Ivoire:' -> "côte d'ivoire" folded to "cote d'ivoire"; flags -> "flag cote d'ivoire"."""
    text = name.strip(":").replace("_", " ")
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", "").replace("\u201d", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = " ".join(text.lower().split())
    if is_flag and not text.startswith("flag"):
        text = "flag " + text
    return text


def find_font(font: Path | None = None) -> Path:
    """The emoji font: `font` when given, else the first of STANDARD_LOCATIONS, else what fc-match names."""
    if font is not None:
        font = Path(font).expanduser()
        if not font.is_file():
            raise UserError(f"emoji font not found at {font}; {INSTALL_HINT} naming an existing file")
        return font
    for path in STANDARD_LOCATIONS:
        if path.is_file():
            return path
    found = _fc_match()
    if found is not None:
        return found
    looked = ", ".join(str(p.parent) for p in STANDARD_LOCATIONS)
    via = " and fc-match" if shutil.which("fc-match") else ""
    raise UserError(f"emoji font {FONT_FILE} not found (looked in {looked}{via}); {INSTALL_HINT}")


def _fc_match() -> Path | None:
    """fc-match always answers with some font: accept it only when it is the Noto Color Emoji family."""
    if shutil.which("fc-match") is None:
        return None
    try:
        out = subprocess.run(["fc-match", "-f", "%{family}\n%{file}", FONT_FAMILY],
                             capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.splitlines()
    if len(lines) == 2 and FONT_FAMILY in lines[0].split(",") and Path(lines[1]).is_file():
        return Path(lines[1])
    return None


@functools.lru_cache(maxsize=4)
def load_font(path: Path, layout: ImageFont.Layout | None = None) -> ImageFont.FreeTypeFont:
    """The font at its bitmap strike, once per process (and per layout engine)."""
    try:
        return ImageFont.truetype(str(path), STRIKE_SIZE, layout_engine=layout)
    except OSError as e:
        raise UserError(f"cannot load {path} as a bitmap emoji font at size {STRIKE_SIZE} ({e}); "
                        f"{INSTALL_HINT} naming NotoColorEmoji.ttf") from e


def _draw(text: str, font: ImageFont.FreeTypeFont) -> Image.Image:
    """The text in colour on a transparent canvas with room to spare on every side."""
    pad = 16
    width = int(font.getlength(text)) + 2 * pad
    height = sum(font.getmetrics()) + 2 * pad  # ascent + descent: 128 px at the strike, as tall as a glyph
    canvas = Image.new("RGBA", (max(width, 1), height), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((pad, pad), text, font=font, embedded_color=True)
    return canvas


class _GlyphCheck:
    """Tells whether a sequence draws as one real glyph of the font; remembers what it drew (as digests).

    Each glyph box or drawing decodes the glyph's PNG (the slow part), so single codepoints are judged by
    the layout engine's box alone and only sequences are drawn.
    """

    def __init__(self, font: ImageFont.FreeTypeFont):
        self.font = font
        self.glyph_width = font.getlength(REFERENCE)
        self.digests: dict[str, bytes | None] = {}
        self.notdef = self.digest(MISSING)

    def digest(self, text: str) -> bytes | None:
        """A digest of the drawing, None when it draws nothing."""
        if text not in self.digests:
            canvas = _draw(text, self.font)
            drawn = canvas.getchannel("A").getbbox() is not None
            self.digests[text] = hashlib.blake2b(canvas.tobytes(), digest_size=16).digest() if drawn else None
        return self.digests[text]

    def why_not(self, text: str) -> str | None:
        """None when `text` draws as one real glyph, else why not."""
        if self.font.getlength(text) > 1.5 * self.glyph_width:
            return "not one glyph (no ligature in the font)"
        bare = text.replace(FE0F, "")
        if len(bare) == 1:
            if _empty(self.font.getbbox(text)):
                return "missing glyph (draws empty)"
            digest = self.digest(text) if self.notdef is not None else None
        else:
            digest = self.digest(text)
            if digest is None:
                return "missing glyph (draws empty)"
            if digest == self.digest(bare[0]):
                return "draws the same as its first codepoint alone"  # tag flags without raqm; Noto's 🏂 tones
        if self.notdef is not None and digest == self.notdef:
            return "missing glyph (draws as .notdef)"
        return None


def _empty(box: tuple[int, int, int, int]) -> bool:
    left, top, right, bottom = box
    return right <= left or bottom <= top


@functools.lru_cache(maxsize=8)
def scan_emoji(font: Path | None = None, skin_tones: bool = False, flags: bool = False,
               layout: ImageFont.Layout | None = None) -> EmojiSet:
    """Which emoji the set holds and which the font cannot draw, cached per process.

    Cheap: lengths and boxes from the layout engine; only sequences of several codepoints are drawn once
    (to compare with their first codepoint), at the 109 px strike, no resizing.
    """
    import emoji as emoji_pkg  # the CLDR names

    path = find_font(font)
    check = _GlyphCheck(load_font(path, layout))
    items, skipped = [], []
    for text, data in emoji_pkg.EMOJI_DATA.items():
        if data["status"] != emoji_pkg.STATUS["fully_qualified"]:
            continue
        codes = [ord(c) for c in text]
        is_flag = any(c in REGIONAL_INDICATORS or c in TAGS for c in codes)
        if (not skin_tones and any(c in SKIN_TONES for c in codes)) or (not flags and is_flag):
            continue
        key = emoji_key(text)
        drawn, why = text, check.why_not(text)
        if why is not None and FE0F in text:  # the basic layout engine draws U+FE0F as a glyph of its own
            plain = text.replace(FE0F, "")
            if check.why_not(plain) is None:
                drawn, why = plain, None
        if why is not None:
            skipped.append((key, why))
            continue
        name = data["en"].strip(":").replace("_", " ")
        items.append(Emoji(key=key, text=text, drawn=drawn, caption=caption_for(data["en"], is_flag),
                           name=name, version=float(data["E"]), is_flag=is_flag))
    items.sort(key=lambda e: e.key)
    return EmojiSet(items=tuple(items), skipped=tuple(sorted(skipped)), font=path)


def render_emoji(text: str, size: int = 64, font: Path | None = None,
                 layout: ImageFont.Layout | None = None) -> Image.Image:
    """One emoji as an RGB size×size image: cropped to the glyph, on white, centred, padded square."""
    if size < 1:
        raise UserError(f"emoji image size must be a positive number of pixels, got {size}")
    glyph = _draw(text, load_font(find_font(font), layout))
    box = glyph.getchannel("A").getbbox()
    if box is None:
        raise ValueError(f"{emoji_key(text)} draws nothing with this font")
    glyph = glyph.crop(box)
    w, h = glyph.size
    border = round(MARGIN * max(w, h))
    side = max(w, h) + 2 * border
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - w) // 2, (side - h) // 2))
    return square.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


def iter_emoji(font: Path | None = None, size: int = 64, skin_tones: bool = False,
               flags: bool = False) -> Iterator[tuple[str, Image.Image, str, dict]]:
    """(key, RGB size×size image on white, caption, meta) for every emoji the font draws, sorted by key."""
    found = scan_emoji(None if font is None else Path(font), skin_tones, flags)
    for item in found.items:
        yield item.key, render_emoji(item.drawn, size, found.font), item.caption, item.meta()


def has_complex_layout() -> bool:
    """Whether Pillow shapes with libraqm: without it, ZWJ sequences, flags and skin tones are skipped."""
    return bool(features.check("raqm"))
