"""The limits of a cover upload, checked before a byte is decoded (the API and the CLI share them)."""

from __future__ import annotations

MAX_COVER_BYTES = 20 << 20  # the largest upload (the API's own limit for the cover route: its global one is 1 MiB)
MAX_COVER_PIXELS = 40_000_000  # width x height of the source; more is refused before it is decoded (bombs)
THUMBNAIL_SIZE = 512  # the thumbnail fits in this square, aspect kept
WEBP_QUALITY = 85
#: media types accepted, and the Pillow format each must decode as
ACCEPTED_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
COVERS_DIR = "covers"  # under the root: the host's copy of each cover, <key>.webp
