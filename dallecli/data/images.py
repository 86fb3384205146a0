"""Any input image to the 8-bit RGB square the dVAE trains on (§2.1), with the paper's filters (App. C).

`process_image(data, config)` is the whole path: identify → decompression-bomb guard → filters
(short side, aspect ratio) → decode (JPEG DCT-domain draft when the image is much larger than the
target) → EXIF orientation → 8-bit RGB → centre crop + Lanczos resize → PNG or JPEG bytes.
Every failure is a `Rejected(reason, detail)`; nothing here raises anything else for bad input.
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Reasons that are a policy decision (the input is fine, we chose not to keep it). Every other reason
# is an error: the input is broken or unreachable, and errors count towards --max-error-rate.
FILTER_REASONS = frozenset({
    "too-small", "aspect-ratio", "caption-too-short", "caption-too-long", "duplicate-image",
})

EXTENSIONS = {"png": "png", "jpg": "jpg", "jpeg": "jpg"}
_HIGH_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_ORIENTATION = 0x0112


class Rejected(Exception):
    """An input we skip: `reason` is a short stable code (counted in manifest.json), `detail` says why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # survive the trip back from a worker process
        return (Rejected, (self.reason, self.detail))

    @property
    def is_error(self) -> bool:
        return self.reason not in FILTER_REASONS


@dataclass(frozen=True)
class ImageConfig:
    size: int = 256                 # §2.1: the dVAE is trained on 256×256 RGB images
    format: str = "jpg"             # "jpg" (photos; quality 95 keeps artefacts below the dVAE's error) or "png"
    quality: int = 95
    min_size: int = 32              # shorter side in pixels; tiny images upscale into blur
    min_aspect: float = 0.5         # App. C: images whose aspect ratio is outside [1/2, 2] are discarded
    max_aspect: float = 2.0
    # Pillow's decompression-bomb limit, taken from the process that builds the config so that
    # worker processes apply the same one. None disables the guard.
    max_pixels: int | None = Image.MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        if self.format not in ("jpg", "png"):
            raise ValueError(f"image format must be 'jpg' or 'png', got {self.format!r}")


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    ext: str            # tar member extension: "jpg" or "png"
    width: int          # of the input, after EXIF orientation
    height: int


def open_image(data: bytes, max_pixels: int | None) -> Image.Image:
    """Identify an image without decoding it; refuse empty files, non-images and decompression bombs."""
    if not data:
        raise Rejected("empty-file", "0 bytes")
    try:
        with warnings.catch_warnings():
            # We apply the limit ourselves below (a warning is not a decision); Pillow still raises
            # DecompressionBombError beyond twice its own limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise Rejected("decompression-bomb", str(exc)) from None
    except UnidentifiedImageError:
        raise Rejected("not-an-image", f"{len(data)} bytes that Pillow cannot identify") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for malformed headers
        raise Rejected("corrupt-image", f"{type(exc).__name__}: {exc}") from None
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise Rejected("decompression-bomb", f"{w}×{h} = {w * h:,} pixels > limit {max_pixels:,}")
    return img


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a corrupt EXIF block must not cost us the image
        return 1


def check_geometry(width: int, height: int, config: ImageConfig) -> None:
    """The size and aspect-ratio filters, applied before any decoding."""
    if min(width, height) < config.min_size:
        raise Rejected("too-small", f"{width}×{height}: shorter side < --min-size {config.min_size}")
    aspect = width / height
    if not config.min_aspect <= aspect <= config.max_aspect:
        raise Rejected("aspect-ratio", f"{width}×{height}: aspect ratio {aspect:.3g} outside "
                                       f"[{config.min_aspect:g}, {config.max_aspect:g}]")


def _scale_high_bit(img: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer / float) greyscale to 8 bits by scaling the full range, not clipping.

    Pillow loads 16-bit PNG/TIFF greyscale as I;16* (or I); `convert("L")` would clip everything above
    255 to white. Mode I is read as 16-bit samples; mode F as [0, 1] when it fits there, else 16-bit.
    """
    a = np.asarray(img)
    if img.mode == "F":
        a = np.nan_to_num(a.astype(np.float64))
        peak = 1.0 if a.max(initial=0.0) <= 1.0 else 65535.0
        out = np.clip(np.rint(a * (255.0 / peak)), 0, 255)
    else:
        a = np.clip(a.astype(np.int64), 0, 65535)
        out = (a * 255 + 32767) // 65535          # round(v · 255 / 65535)
    return Image.fromarray(out.astype(np.uint8), "L")


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB. Transparency is composited on white (not on black, which is what
    dropping the alpha channel of most web images shows)."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _HIGH_BIT_MODES:
        return _scale_high_bit(img).convert("RGB")
    if img.mode == "CMYK":
        return _cmyk_to_rgb(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def upright_rgb8(img: Image.Image) -> Image.Image:
    """A loaded image as it is meant to be seen, in 8-bit RGB: turned by its EXIF orientation, transparency on
    white (`to_rgb8`): how `build-shards` makes the training images, and how images read elsewhere (an image
    prompt, images to rerank or evaluate) are made to look like them."""
    img.load()
    if _orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    return to_rgb8(img)


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    """CMYK through its embedded ICC profile when there is one (print JPEGs), else Pillow's formula."""
    profile = img.info.get("icc_profile")
    if profile:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # noqa: BLE001 - a broken profile: fall back to the plain conversion
            pass
    return img.convert("RGB")


def square_resize(img: Image.Image, size: int) -> Image.Image:
    """Centre crop to a square and resize to size×size with Lanczos (reducing_gap: fast box pre-reduction
    for large downscales, visually identical)."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side),
                      reducing_gap=3.0)


def encode(img: Image.Image, fmt: str, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG", compress_level=6)
    else:
        img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def process_image(data: bytes | Image.Image, config: ImageConfig) -> EncodedImage:
    """Bytes of any image file (or an image already rendered in memory) → the encoded training image."""
    img = open_image(data, config.max_pixels) if isinstance(data, (bytes, bytearray)) else data
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # Pillow's notes on odd files must not garble the progress bar
            return _decode_resize_encode(img, config)
    except Rejected:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt data surfaces as many exception types
        raise Rejected("corrupt-image", f"{type(exc).__name__}: {exc}") from None


def _decode_resize_encode(img: Image.Image, config: ImageConfig) -> EncodedImage:
    orientation = _orientation(img)
    w, h = img.size if orientation < 5 else img.size[::-1]   # 5–8 swap width and height
    check_geometry(w, h, config)
    if img.format == "JPEG":
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers the target (much faster).
        short = min(img.size)
        img.draft(None, (math.ceil(img.size[0] * config.size / short),
                         math.ceil(img.size[1] * config.size / short)))
    out = square_resize(upright_rgb8(img), config.size)
    return EncodedImage(encode(out, config.format, config.quality), config.format, w, h)
