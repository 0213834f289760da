"""The model store: where the fleet's canonical copy of every model lives (``MODELBUS_STORE_URL``).

``open_store(config)`` gives the configured :class:`BlobStore`, or None for ``shared`` (the models
directory, today's behaviour). See ``blobs.py`` for the store's rule and ``s3.py`` for S3.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelbus.services.store.errors import (
    BlobCorruptError,
    BlobMissingError,
    BlobStoreUnavailableError,
    CacheFullError,
    StoreConfigError,
    StoreError,
)
from modelbus.services.store.location import StoreLocation, parse_store_url

if TYPE_CHECKING:
    from modelbus.services.store.blobs import BlobStore, FileBlobStore, check_digest, file_digest

#: what comes from services.store.blobs (BLAKE3, the transfer code), imported on first use: the settings
#: import this package for its errors and its URL parser, and a CLI ``list`` needs no more
_FROM_BLOBS = ("BlobStore", "FileBlobStore", "check_digest", "file_digest")


def __getattr__(name: str) -> Any:
    if name in _FROM_BLOBS:
        from modelbus.services.store import blobs
        return getattr(blobs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "BlobCorruptError",
    "BlobMissingError",
    "BlobStore",
    "BlobStoreUnavailableError",
    "CacheFullError",
    "FileBlobStore",
    "StoreConfigError",
    "StoreError",
    "StoreLocation",
    "check_digest",
    "file_digest",
    "open_store",
    "parse_store_url",
]


def open_store(config: Any) -> BlobStore | None:
    """The blob store ``config.store_url`` names; None when models live in the shared models directory."""
    location = parse_store_url(getattr(config, "store_url", None))
    if location.scheme == "file":
        from modelbus.services.store.blobs import FileBlobStore
        assert location.path is not None
        return FileBlobStore(location.path)
    if location.scheme == "s3":
        from modelbus.services.store.s3 import (
            S3BlobStore,  # boto3 costs ~0.3 s to import: only where it is used
        )
        return S3BlobStore(location, endpoint_url=getattr(config, "s3_endpoint_url", None),
                           retries=int(getattr(config, "store_retries", 5)))
    return None
