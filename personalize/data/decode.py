"""Robust image decoding: whatever a user's folder holds becomes an RGB image, or a named reason why not.

Rules: EXIF orientation applied; RGBA / LA / transparent palette images composited on a background
(alpha kept for an optional loss mask); palette, grayscale, CMYK, 16-bit and float images converted to
8-bit RGB; animated formats use their first frame; a decompression-bomb limit on the pixel count.
Everything that cannot be decoded raises `BadImage` with a short reason ("truncated", "not an image").
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageFile, ImageOps, UnidentifiedImageError

# PIL's own default (about 89.5 MP, a 9459 x 9459 image); larger files are refused, not decoded.
MAX_PIXELS = 89_478_485
ORIENTATION = 0x0112  # EXIF tag
ROTATING_ORIENTATIONS = {5, 6, 7, 8}  # transposed / rotated by 90 or 270 degrees


# ISO-BMFF brands of HEIC/HEIF (iPhone photos) and AVIF: readable only with a plugin.
HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}

try:  # optional: pillow-heif adds HEIC/HEIF (and AVIF) to PIL when installed
    from pillow_heif import register_heif_opener  # type: ignore[import-not-found]

    register_heif_opener()
except ImportError:
    pass


class BadImage(Exception):
    """An unusable file; str(error) is the short reason shown in the skip summary."""


@dataclass
class Decoded:
    image: Image.Image  # RGB, 8 bit, orientation applied, alpha composited (JPEG: maybe draft-reduced)
    alpha: Image.Image | None  # "L" mask (255 = opaque) when the file had transparency
    size: tuple[int, int]  # (h, w) of the full image, orientation applied


def parse_color(name: str) -> tuple[int, int, int]:
    try:
        return ImageColor.getrgb(name)[:3]
    except ValueError:
        raise BadImage(f"unknown background color '{name}'") from None


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float single-channel modes -> "L" by value range (PIL's convert clips instead)."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        values = values * 255.0 if values.max(initial=0.0) <= 1.0 else values  # [0, 1] floats or 0..255
    elif image.mode.startswith("I;16") or values.max(initial=0.0) > 255:
        values = values / 257.0  # 0..65535 -> 0..255
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))


def to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Decoded:
    """Any PIL mode -> RGB (+ alpha when the image has transparency)."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_8bit(image)
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba.convert("RGB"), mask=alpha)
        return Decoded(canvas, alpha, (canvas.height, canvas.width))
    if image.mode == "L" and "transparency" in image.info:
        return to_rgb(image.convert("LA"), background)
    if image.mode != "RGB":
        image = image.convert("RGB")  # "1", "L", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"
    return Decoded(image, None, (image.height, image.width))


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ORIENTATION, 1))
    except Exception:  # unreadable EXIF: treat as upright
        return 1


def open_image(
    data: bytes, max_pixels: int = MAX_PIXELS, draft: tuple[int, int] | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Bytes -> (decoded first frame with orientation applied, full (h, w)); BadImage otherwise.

    `draft` (h, w): JPEGs may decode at 1/2, 1/4 or 1/8 scale (DCT scaling) as long as the result
    still covers that size: much faster for phone photos trained at 512 px. Other formats ignore it.
    """
    if not data:
        raise BadImage("empty file")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise BadImage(f"too large: {width}x{height} pixels, over the decompression-bomb limit")
            if width == 0 or height == 0:
                raise BadImage("no pixels")
            rotated = _orientation(image) in ROTATING_ORIENTATIONS
            size = (width, height) if rotated else (height, width)  # (h, w) once oriented
            if draft is not None and image.format == "JPEG":
                want_h, want_w = (draft[1], draft[0]) if rotated else draft  # in stored orientation
                image.draft(image.mode, (want_w, want_h))
            image.seek(0)  # animated GIF/WebP/APNG/TIFF: the first frame
            image.load()
    except BadImage:
        raise
    except Image.DecompressionBombError:
        raise BadImage("too large: over the decompression-bomb limit") from None
    except UnidentifiedImageError:
        if data[4:8] == b"ftyp" and data[8:12] in HEIF_BRANDS:
            raise BadImage("HEIC/AVIF needs `pip install pillow-heif`, or convert it to JPEG") from None
        raise BadImage("not an image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        text = str(error).lower()
        if "truncated" in text or isinstance(error, EOFError) or "end of file" in text:
            raise BadImage("truncated") from None
        raise BadImage(f"corrupt: {str(error).splitlines()[0][:80]}") from None
    try:
        return ImageOps.exif_transpose(image), size
    except Exception:  # a broken EXIF block must not lose an otherwise good image
        return image, (image.height, image.width)


def decode(
    data: bytes,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int = MAX_PIXELS,
    draft: tuple[int, int] | None = None,
) -> Decoded:
    image, size = open_image(data, max_pixels, draft)
    try:
        decoded = to_rgb(image, background)
    except (OSError, ValueError) as error:
        raise BadImage(f"unsupported image mode {image.mode}: {error}") from None
    decoded.size = size
    return decoded


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise BadImage(f"unreadable: {error.strerror or error}") from None
