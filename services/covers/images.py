"""Turning an uploaded image into a cover: checked first, then decoded once, then re-encoded.

The rule: nothing is decoded before it has passed the cheap checks (its size in bytes, its magic bytes,
the width and height its header declares), so a file that is not an image, or a small file that would
decode into gigabytes of pixels (a decompression bomb), is refused by name without the work. What
passes is re-encoded as a WebP thumbnail: the stored cover never holds the uploader's bytes.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import blake3
from PIL import Image, ImageOps, UnidentifiedImageError

from modelbus.services.covers.errors import CoverTooLarge, NotAnImage
from modelbus.services.covers.limits import MAX_COVER_BYTES, MAX_COVER_PIXELS, THUMBNAIL_SIZE, WEBP_QUALITY

ACCEPTED = "a PNG, JPEG or WebP image"


@dataclass(frozen=True)
class Thumbnail:
    webp: bytes
    width: int
    height: int

    @property
    def blake3(self) -> str:
        return blake3.blake3(self.webp).hexdigest()


def sniff(head: bytes) -> str | None:
    """The Pillow format the first bytes announce (PNG, JPEG, WEBP), or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def make_thumbnail(data: bytes, what: str = "the cover") -> Thumbnail:
    """The WebP thumbnail of ``data``; NotAnImage or CoverTooLarge naming ``what`` and the problem."""
    if len(data) > MAX_COVER_BYTES:
        raise CoverTooLarge(f"{what} is {len(data)} bytes, over the limit of {MAX_COVER_BYTES} bytes")
    fmt = sniff(data[:16])
    if fmt is None:
        raise NotAnImage(f"{what} is not {ACCEPTED}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt]) as image:
                width, height = image.size
                if width * height > MAX_COVER_PIXELS:
                    raise CoverTooLarge(f"{what} is {width}x{height} pixels, over the limit of {MAX_COVER_PIXELS} "
                                        "(refused before decoding: a decompression bomb?)")
                image.draft("RGB", (THUMBNAIL_SIZE, THUMBNAIL_SIZE))  # JPEG: decode at a reduced scale
                image.load()
                return _encode(ImageOps.exif_transpose(image))
    except (CoverTooLarge, NotAnImage):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise CoverTooLarge(f"{what} is a decompression bomb ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise NotAnImage(f"{what} is not a readable {fmt} image ({' '.join(str(exc).split()) or type(exc).__name__})"
                         ) from None


def _encode(image: Image.Image) -> Thumbnail:
    alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    image = image.convert("RGBA" if alpha else "RGB")
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="WEBP", quality=WEBP_QUALITY, method=4)
    return Thumbnail(out.getvalue(), image.width, image.height)
