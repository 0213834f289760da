"""``ModelLocker``: the spec's ``ModelInfo.context``, a counted lock on one cached model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.load.cache import ModelCache


class ModelLocker:
    """Locks a cached model on the execution device for a ``with`` block (re-entrant, counted)."""

    def __init__(self, cache: ModelCache, key: str) -> None:
        self.cache = cache
        self.key = key

    def lock(self) -> Any:
        return self.cache.lock(self.key)

    def unlock(self) -> None:
        self.cache.unlock(self.key)

    def __enter__(self) -> Any:
        return self.lock()

    def __exit__(self, *exc: object) -> None:
        self.unlock()
