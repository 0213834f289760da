"""Cover images of models: uploads checked and re-encoded to WebP thumbnails (:mod:`.images`, Pillow,
imported on first use), kept in Redis and mirrored under ``$MODELBUS_ROOT/covers`` (:mod:`.storage`)."""

from modelbus.services.covers.errors import CoverError, CoverTooLarge, NotAnImage
from modelbus.services.covers.limits import ACCEPTED_TYPES, MAX_COVER_BYTES, MAX_COVER_PIXELS, THUMBNAIL_SIZE

__all__ = ["ACCEPTED_TYPES", "MAX_COVER_BYTES", "MAX_COVER_PIXELS", "THUMBNAIL_SIZE", "CoverError", "CoverTooLarge",
           "NotAnImage"]
