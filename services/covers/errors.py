"""Errors of cover images.

    CoverError (ModelbusError)
    ├── NotAnImage     (InvalidInput) not a PNG, JPEG or WebP image, a broken one, or a decompression bomb
    └── CoverTooLarge  (TooLarge)     more bytes or pixels than the limits allow
"""

from __future__ import annotations

from modelbus.events.errors import InvalidInput, ModelbusError, TooLarge


class CoverError(ModelbusError):
    """Base of the cover errors."""


class NotAnImage(CoverError, InvalidInput):
    pass


class CoverTooLarge(CoverError, TooLarge):
    pass
