"""Images for the cover tests, made at test time with Pillow (and one forged header)."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def png(width: int = 640, height: int = 480, color: tuple[int, int, int] = (200, 30, 90)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


def jpeg(width: int = 300, height: int = 900) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 40)).save(out, format="JPEG")
    return out.getvalue()


def bomb(side: int = 60_000) -> bytes:
    """A PNG of a few hundred bytes whose header declares side x side pixels (zeros compress to nothing)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = zlib.compress(b"\0" * (side + 1) * 4, 9)  # the first rows only: the header is what matters
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def truncated_png() -> bytes:
    return png()[:200]  # the magic bytes and the header, then nothing
