"""All Pillow handling of user images.

Invariants:
- Nothing but PNG, JPEG, WebP and GIF (first frame) is decoded; the format is read from the
  file's bytes, never from its name.
- Files over `MAX_IMAGE_BYTES` and images over `MAX_IMAGE_PIXELS` are refused before any pixel
  data is decoded (the header gives the size), far below Pillow's own decompression-bomb limit.
- What comes out is a fully loaded RGB image with EXIF orientation applied and no metadata.
  A PNG's metadata chunks (text, ICC profile, ...) are dropped before Pillow reads the file, so
  metadata we would throw away anyway (Pillow refuses a compressed chunk over 1 MB) never refuses
  an image.
- Every refusal is an `ImageError` whose message can be shown to the user as is.
"""
from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_IMAGE_PIXELS = 16_000_000  # e.g. 4000 x 4000
MAX_IMAGE_SIDE = 8192


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_PIXEL_CHUNKS = (b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND", b"eXIf")  # eXIf: the orientation


class ImageError(ValueError):
    """An uploaded file is not an image we accept; the message says why."""


def png_pixels_only(data: bytes) -> bytes:
    """A PNG with only the chunks that make its pixels (and its EXIF orientation); anything that is
    not a well-formed PNG is returned as it is, for Pillow to judge."""
    if not data.startswith(PNG_SIGNATURE):
        return data
    kept, at = [PNG_SIGNATURE], len(PNG_SIGNATURE)
    while at + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        end = at + 12 + length
        if end > len(data):
            return data  # truncated: Pillow says so
        if kind in PNG_PIXEL_CHUNKS:
            kept.append(data[at:end])
        at = end
        if kind == b"IEND":
            break
    return b"".join(kept)


def load_image(source: str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
    """Open, check and normalise one user image. `name` is only used in messages."""
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        label = name or "the image"
    else:
        path = Path(source)
        label = name or path.name
        try:
            size = path.stat().st_size
        except OSError:
            raise ImageError(f"{label}: the file could not be read") from None
        if size > MAX_IMAGE_BYTES:
            raise ImageError(f"{label}: the file is {size / 1e6:.1f} MB; the limit is {MAX_IMAGE_BYTES / 1e6:.0f} MB")
        data = path.read_bytes()
    if not data:
        raise ImageError(f"{label}: the file is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"{label}: the file is {len(data) / 1e6:.1f} MB; the limit is {MAX_IMAGE_BYTES / 1e6:.0f} MB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(png_pixels_only(data)), formats=list(ALLOWED_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{label}: the image has far too many pixels; the limit is "
                         f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels") from None
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not an image in an accepted format ({', '.join(ALLOWED_FORMATS)})") from None
    except Exception as error:  # Pillow raises many kinds on hostile headers
        raise ImageError(f"{label}: the image header is damaged ({type(error).__name__})") from None
    width, height = image.size
    if width < 1 or height < 1 or width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE \
            or width * height > MAX_IMAGE_PIXELS:
        raise ImageError(f"{label}: {width}x{height} pixels is too large; the limit is "
                         f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels and {MAX_IMAGE_SIDE} pixels a side")
    try:
        image.seek(0)  # GIF and animated WebP: the first frame only
        image.load()
        image = ImageOps.exif_transpose(image)
        rgb = image.convert("RGB")
    except Exception as error:
        raise ImageError(f"{label}: the image data is truncated or damaged ({type(error).__name__})") from None
    clean = Image.new("RGB", rgb.size)
    clean.paste(rgb)  # a fresh image carries no EXIF, ICC or text chunks
    return clean
