"""Errors of the model store and the host caches, one family under :class:`StoreError`.

    StoreError
    ├── StoreConfigError       (InvalidInput) MODELBUS_STORE_URL or a setting of it cannot be used
    ├── StoreUnavailableError  (Unavailable) the store did not answer, the bucket is missing, credentials
    │                                        were refused: the message names the URL and the reason
    ├── BlobMissingError       (NotFound) a blob a manifest names is not in the store
    ├── BlobCorruptError       (Failed) a blob's bytes do not hash to its name (or have the wrong size)
    └── CacheFullError         (TooLarge) the host cache cannot hold a model even after evicting

botocore's and the filesystem's errors are translated where they come in (``s3.py``, ``transfer.py``).
"""

from __future__ import annotations

from events.errors import Failed, InvalidInput, ModelbusError, NotFound, TooLarge, Unavailable


class StoreError(ModelbusError):
    """Base of every error raised by :mod:`services.store`."""


class StoreConfigError(StoreError, InvalidInput):
    pass


class StoreUnavailableError(StoreError, Unavailable):
    pass


class BlobMissingError(StoreError, NotFound):
    pass


class BlobCorruptError(StoreError, Failed):
    pass


class CacheFullError(StoreError, TooLarge):
    pass
