"""Errors of the model store and the host caches, one family under :class:`StoreError`.

    StoreError
    ├── StoreConfigError       (InvalidInput) MODELBUS_STORE_URL or a setting of it cannot be used
    ├── BlobStoreUnavailableError (Unavailable) the store did not answer, the bucket is missing, credentials
    │                                       were refused: the message names the URL and the reason (not the
    │                                       event layer's StoreUnavailableError, which is about Redis)
    ├── BlobMissingError       (NotFound) a blob a manifest names is not in the store
    ├── BlobCorruptError       (Failed) a blob's bytes do not hash to its name (or have the wrong size)
    ├── CacheFullError         (TooLarge) the host cache cannot hold a model even after evicting
    └── TransferStopped        (Failed) another part of a transfer failed: this one stops (internal, ``transfer``)

botocore's and the filesystem's errors are translated where they come in (``s3.py``, ``transfer.py``).
"""

from __future__ import annotations

from modelbus.events.errors import Failed, InvalidInput, ModelbusError, NotFound, TooLarge, Unavailable


class StoreError(ModelbusError):
    """Base of every error raised by :mod:`services.store`."""


class StoreConfigError(StoreError, InvalidInput):
    pass


class BlobStoreUnavailableError(StoreError, Unavailable):
    pass


class BlobMissingError(StoreError, NotFound):
    pass


class BlobCorruptError(StoreError, Failed):
    pass


class CacheFullError(StoreError, TooLarge):
    pass


class TransferStopped(StoreError, Failed):
    """Another part of a transfer failed: this one stops (internal; the first failure is what is raised)."""
