"""Errors of the load service, one family under :class:`LoadError`.

Hierarchy::

    LoadError
    ├── ModelNotFoundException      (NotFound) the record exists but its files do not
    ├── InvalidModelException       (InvalidInput) the files do not load as what the record says
    │   └── UnsafeModelException    (InvalidInput) a pickle scan found code that would run on load
    ├── SubmodelRequiredError       (InvalidInput) a main model was asked for without a submodel (a ValueError)
    └── CacheError                  the cache cannot hold or place a model
        ├── ModelTooLargeError      (TooLarge) larger than the cache limit that must hold it
        └── CacheOutOfMemoryError   (Unavailable) the device ran out of memory during a move; the cache is
                                    unchanged

``UnknownModelException`` (the key is not in the store) belongs to the record service and is
re-exported by :mod:`services.load` when that package is importable.
"""

from __future__ import annotations

from modelbus.events.errors import InvalidInput, ModelbusError, NotFound, TooLarge, Unavailable


class LoadError(ModelbusError):
    """Base of every error raised by :mod:`services.load`."""


class ModelNotFoundException(LoadError, NotFound):
    """The record is known, but nothing is found at its path."""


class InvalidModelException(LoadError, InvalidInput):
    """The files at the record's path do not load as the record's type and format."""


class UnsafeModelException(InvalidModelException):
    """A pickled checkpoint holds imports that would run code when unpickled."""


class SubmodelRequiredError(LoadError, InvalidInput, ValueError):
    """A main model is a bundle: a submodel type (unet, vae, ...) must be named."""


class CacheError(LoadError):
    """The cache cannot hold or place a model."""


class ModelTooLargeError(CacheError, TooLarge):
    """The model needs more bytes than the cache tier that must hold it may ever use."""


class CacheOutOfMemoryError(CacheError, Unavailable):
    """The device ran out of memory while a model moved; the model stayed where it was."""
