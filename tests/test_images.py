"""dallecli.data.images: every input mode to 8-bit RGB, the filters, the guard, crop and resize."""
from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from dallecli.data.images import (
    ImageConfig,
    Rejected,
    open_image,
    process_image,
    square_resize,
    to_rgb8,
    upright_rgb8,
)

PNG = ImageConfig(size=32, format="png", min_size=8)


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def decoded(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    assert img.mode == "RGB"
    return np.asarray(img)


def reason(data, config=PNG) -> str:
    with pytest.raises(Rejected) as exc:
        process_image(data, config)
    return exc.value.reason


def test_plain_rgb_jpeg_becomes_a_square_of_the_requested_size():
    img = Image.new("RGB", (64, 48), (200, 30, 40))
    out = process_image(save(img, "JPEG"), ImageConfig(size=32, min_size=8))
    assert out.ext == "jpg" and (out.width, out.height) == (64, 48)
    arr = decoded(out.data)
    assert arr.shape == (32, 32, 3)
    assert np.abs(arr.astype(int) - (200, 30, 40)).max() <= 6


def test_centre_crop_keeps_the_middle():
    # left third blue, middle red, right third blue: the square crop of a 96×32 image... is the middle 32.
    a = np.zeros((32, 96, 3), np.uint8)
    a[:, :] = (0, 0, 255)
    a[:, 32:64] = (255, 0, 0)
    out = square_resize(Image.fromarray(a), 16)
    assert out.size == (16, 16)
    assert np.asarray(out)[:, 2:14].mean(axis=(0, 1)).round().tolist() == [255, 0, 0]


def test_large_jpeg_uses_draft_decoding_and_stays_correct():
    rng = np.random.default_rng(0)
    a = np.full((1200, 1600, 3), (40, 160, 90), np.uint8)
    a[::2] += rng.integers(0, 8, size=a[::2].shape, dtype=np.uint8)
    out = process_image(save(Image.fromarray(a), "JPEG", quality=90), ImageConfig(size=64))
    arr = decoded(out.data)
    assert arr.shape == (64, 64, 3) and (out.width, out.height) == (1600, 1200)
    assert np.abs(arr.reshape(-1, 3).mean(0) - (42, 162, 92)).max() < 4


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    value = 128 * 257                                  # mid-grey in 16 bits
    a = np.full((40, 40), value, np.uint16)
    a[:, :20] = 65535
    data = save(Image.fromarray(a), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    arr = decoded(process_image(data, PNG).data)
    assert arr[16, 28].tolist() == [128, 128, 128]     # clipping would give 255
    assert arr[16, 2].tolist() == [255, 255, 255]


def png48(width: int, height: int, rgb16: tuple[int, int, int]) -> bytes:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow cannot write one)."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = b"\0" + struct.pack(">HHH", *rgb16) * width
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * height)) + chunk(b"IEND", b""))


def test_48_bit_rgb_png_is_scaled_not_clipped():
    arr = decoded(process_image(png48(40, 40, (40000, 1000, 65535)), PNG).data)
    assert arr[5, 5].tolist() == [156, 3, 255]          # the high byte of each channel (40000 // 256 = 156)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_high_bit_modes_in_memory(mode):
    img = Image.new(mode, (16, 16), 40000)
    rgb = to_rgb8(img)
    assert rgb.mode == "RGB" and rgb.getpixel((3, 3)) == (156, 156, 156)   # round(40000·255/65535)


def test_float_image_in_unit_range():
    img = Image.fromarray(np.full((8, 8), 0.5, np.float32))
    assert to_rgb8(img).getpixel((0, 0)) == (128, 128, 128)


def test_cmyk_jpeg_becomes_rgb():
    img = Image.new("CMYK", (40, 40), (0, 255, 255, 0))      # full magenta + yellow: red
    arr = decoded(process_image(save(img, "JPEG", quality=95), PNG).data)
    r, g, b = arr.reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60


def test_palette_png_with_transparency_is_composited_on_white():
    img = Image.new("P", (40, 40), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (20, 0, 40, 40))                            # right half red, left half index 0
    data = save(img, "PNG", transparency=0)                  # index 0 transparent (black in the palette)
    arr = decoded(process_image(data, PNG).data)
    assert arr[16, 2].tolist() == [255, 255, 255]
    assert arr[16, 29].tolist() == [255, 0, 0]


@pytest.mark.parametrize("mode,value,expected", [
    ("L", 77, (77, 77, 77)),
    ("LA", (77, 0), (255, 255, 255)),             # fully transparent: white
    ("LA", (0, 255), (0, 0, 0)),
    ("RGBA", (0, 0, 255, 0), (255, 255, 255)),
    ("1", 1, (255, 255, 255)),
])
def test_other_modes(mode, value, expected):
    img = Image.new(mode, (40, 40), value)
    arr = decoded(process_image(save(img, "PNG"), PNG).data)
    assert tuple(arr[5, 5].tolist()) == expected


def test_exif_orientation_is_applied():
    a = np.zeros((40, 80, 3), np.uint8)                # 80 wide, 40 high: left half red, right half blue
    a[:, :40] = (255, 0, 0)
    a[:, 40:] = (0, 0, 255)
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6                                    # stored rotated: display turns it 90° clockwise
    data = save(img, "PNG", exif=exif.tobytes())
    out = process_image(data, ImageConfig(size=40, format="png", min_size=8))
    assert (out.width, out.height) == (40, 80)          # displayed size
    arr = decoded(out.data)
    # 90° clockwise: the left (red) half ends up on top, blue at the bottom.
    assert arr[2, 20].tolist() == [255, 0, 0] and arr[37, 20].tolist() == [0, 0, 255]


def test_images_read_outside_build_shards_look_as_the_training_images_did(tmp_path):
    """An image prompt, images to rerank or evaluate: transparency on white and EXIF orientation, as
    `build-shards` makes them. A plain convert("RGB") showed a transparent background black."""
    from dallecli.evaluate.fid import ImageRef
    from dallecli.rerank import _open

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:6, 2:6] = (255, 0, 0, 255)                   # a red square on a transparent background
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    turned = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8))  # red | blue, 2 wide 1 high
    exif = turned.getexif()
    exif[0x0112] = 6                                    # displayed turned 90° clockwise: red on top
    turned.save(tmp_path / "e.png", exif=exif.tobytes())
    for read in (lambda p: upright_rgb8(Image.open(p)), _open, lambda p: ImageRef(str(p)).open()):
        im = np.asarray(read(tmp_path / "t.png"))
        assert im.shape == (8, 8, 3) and im[0, 0].tolist() == [255, 255, 255] and im[3, 3].tolist() == [255, 0, 0]
        assert np.asarray(read(tmp_path / "e.png")).tolist() == [[[255, 0, 0]], [[0, 0, 255]]]


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "WEBP", "GIF"])
def test_other_file_formats(fmt):
    img = Image.new("RGB", (48, 40), (0, 128, 255))
    arr = decoded(process_image(save(img, fmt, **({"lossless": True} if fmt == "WEBP" else {})), PNG).data)
    assert np.abs(arr[8, 8].astype(int) - (0, 128, 255)).max() <= 8


def test_gif_first_frame():
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert decoded(process_image(buf.getvalue(), PNG).data)[5, 5].tolist() == [255, 0, 0]


def test_bad_files_are_rejected_with_a_reason():
    good = save(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    assert reason(b"") == "empty-file"
    assert reason(b"hello, I am text\n" * 5) == "not-an-image"
    noisy = save(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")
    assert reason(noisy[: len(noisy) // 2]) == "corrupt-image"
    assert reason(good[:20]) in ("corrupt-image", "not-an-image")


def test_size_and_aspect_filters():
    assert reason(save(Image.new("RGB", (1, 1)), "PNG")) == "too-small"
    assert reason(save(Image.new("RGB", (64, 7)), "PNG")) == "too-small"
    assert reason(save(Image.new("RGB", (100, 40)), "PNG")) == "aspect-ratio"      # 2.5 > 2
    assert reason(save(Image.new("RGB", (40, 100)), "PNG")) == "aspect-ratio"
    process_image(save(Image.new("RGB", (80, 40)), "PNG"), PNG)                    # exactly 2: kept
    process_image(save(Image.new("RGB", (40, 80)), "PNG"), PNG)


def test_decompression_bomb_is_rejected_not_raised():
    data = save(Image.new("L", (300, 300)), "PNG")
    assert reason(data, ImageConfig(size=32, max_pixels=10_000)) == "decompression-bomb"
    with pytest.raises(Rejected, match="decompression-bomb"):
        open_image(data, 300 * 300 - 1)
    process_image(data, ImageConfig(size=32, max_pixels=300 * 300))


def test_pillow_own_bomb_error_is_a_reject(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)      # Pillow raises beyond 2× its limit itself
    data = save(Image.new("L", (300, 300)), "PNG")
    assert reason(data, ImageConfig(size=32, max_pixels=None)) == "decompression-bomb"


def test_rejected_survives_pickling():
    r = pickle.loads(pickle.dumps(Rejected("too-small", "1×1")))
    assert (r.reason, r.detail, r.is_error) == ("too-small", "1×1", False)
    assert Rejected("not-an-image").is_error


def test_png_output_is_deterministic():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 50, 3), np.uint8))
    data = save(img, "PNG")
    assert process_image(data, PNG).data == process_image(data, PNG).data


def test_grid_captions_keep_their_letters_without_a_unicode_font(monkeypatch):
    """Grid captions were drawn in Pillow's ASCII-only font, so "carré" came out as "carr▯". DejaVu Sans is used
    where installed; without it accents are dropped and the rest of a caption stays readable."""
    from PIL import ImageFont

    from dallecli import imageutil

    imageutil._label_font.cache_clear()
    truetype = ImageFont.truetype

    def without_dejavu(font=None, *args, **kwargs):
        if font == "DejaVuSans.ttf":
            raise OSError("cannot open resource")
        return truetype(font, *args, **kwargs)

    monkeypatch.setattr(ImageFont, "truetype", without_dejavu)
    try:
        _, readable = imageutil._label_font()
        assert readable("un carré rouge 🟥, Ærø") == "un carre rouge ?, ?r?"
        sheet = imageutil.grid([Image.new("RGB", (32, 32), "red")], 1, ["un carré rouge"])
        assert sheet.size[0] == 36 and sheet.size[1] > 36  # a caption under the image
    finally:
        imageutil._label_font.cache_clear()


def test_grid_caption_lines_fit_their_cell_in_the_font_drawn():
    """The wrap assumed 6 px per character, so a caption of wide letters ran past its cell, and the line height
    (11 px) was less than DejaVu Sans's, so lines overlapped."""
    from dallecli.imageutil import _label_font, _wrap

    font, _ = _label_font()
    for text in ["lines MMMM WWWW mmm", "supercalifragilisticexpialidocious", "a red circle above a blue square"]:
        lines = _wrap(text, font, 128)
        assert all(font.getlength(line) <= 128 for line in lines), lines
        assert "".join(lines).replace(" ", "") == text.replace(" ", "")
