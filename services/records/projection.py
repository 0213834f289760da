"""The record projection interface: ``events.projection.Projection`` plus the queries the service needs.

``apply`` folds a batch into per-key changes first, then hands them to the backend's ``_commit``,
which writes the rows and the checkpoint in one transaction and skips what it already holds (two
processes sharing one database may both try to apply the same batch).

Parsed configs are cached per key; a cached config is never handed out itself, only a copy, so a
caller mutating what it got cannot corrupt the projection.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from events.schema import ModelRenamed
from events.store import StoredEvent, position_key
from services.records.enums import BaseModelType, ModelType
from services.records.fold import State, is_model_event, next_state, resolve_path
from services.records.models import CLASSES_BY_TAG, ModelConfigBase, tag_of
from services.records.parsing import config_class

RECORDS_VERSION = "3.2"  # the spec's version() of the record store
KIND = "modelbus-model-records"  # marks our files and tables: anything else is not opened

#: key -> (new state or None when removed, aggregate version)
Changes = dict[str, tuple[State, int]]


def config_from_state(state: dict[str, Any]) -> ModelConfigBase:
    cls = CLASSES_BY_TAG.get(tag_of(state.get("model_type", ""), state.get("model_format", ""))) \
        or config_class(state)
    return cls.model_validate(state)


def copy_config(config: ModelConfigBase) -> ModelConfigBase:
    # a shallow copy with fresh lists: the only mutable fields a config has
    return config.model_copy(update={"tags": list(config.tags), "compatible_bases": list(config.compatible_bases)})


def after(batch: Sequence[StoredEvent], checkpoint: str) -> list[StoredEvent]:
    """The part of a batch strictly after ``checkpoint`` (already-applied events are skipped)."""
    floor = position_key(checkpoint)
    if not batch or position_key(batch[0].position) > floor:
        return list(batch)  # the usual case: the whole batch is new
    return [s for s in batch if position_key(s.position) > floor]


class RecordProjection(ABC):
    """A read model of the records. ``lock`` serialises applying and querying within a process."""

    def __init__(self, models_dir: Path | None = None, lock: Any = None) -> None:
        self.models_dir = models_dir
        self.lock = lock if lock is not None else threading.RLock()
        self._cache: dict[str, ModelConfigBase] = {}
        #: the stored rows use an older layout of ours: the service rebuilds them on open
        self.stale = False

    # --- the Projection protocol ----------------------------------------------------------------

    @abstractmethod
    def checkpoint(self) -> str: ...

    def apply(self, batch: Sequence[StoredEvent]) -> None:
        if not batch:
            return
        with self.lock:
            self._commit(batch, batch[-1].position)

    @abstractmethod
    def reset(self) -> None: ...

    @abstractmethod
    def last_event_id(self) -> str | None:
        """The id of the event at the checkpoint: with it, opening checks the rows came from this log."""

    def fold_batch(self, batch: Iterable[StoredEvent]) -> Changes:
        """Per-key outcome of a batch; only a rename needs the stored state (it changes one field)."""
        changes: Changes = {}
        for stored in batch:
            event = stored.event
            if not is_model_event(event):
                continue
            key = event.aggregate_id
            if isinstance(event, ModelRenamed):
                current = changes[key][0] if key in changes else self._load_state(key)
            else:
                current = None
            changes[key] = (next_state(current, event), event.aggregate_version)
        for key in changes:
            self._cache.pop(key, None)
        return changes

    @abstractmethod
    def _commit(self, batch: Sequence[StoredEvent], checkpoint: str) -> None:
        """Apply the events after the stored checkpoint and store ``checkpoint``, atomically."""

    @abstractmethod
    def _load_state(self, key: str) -> State: ...

    # --- queries --------------------------------------------------------------------------------

    def get(self, key: str, copy: bool = True) -> ModelConfigBase | None:
        """The record; ``copy=False`` gives the cached object itself (callers must not change it)."""
        with self.lock:
            cached = self._cache.get(key)
            if cached is None:
                state = self._load_state(key)
                if state is None:
                    return None
                cached = self._cache[key] = config_from_state(state)
            return copy_config(cached) if copy else cached

    @abstractmethod
    def version_of(self, key: str) -> int:
        """The aggregate version this projection has seen for ``key`` (removed records included)."""

    def presence(self, key: str) -> tuple[bool, int]:
        """Whether ``key`` has a record, and :meth:`version_of` it: what a writer checks before appending."""
        with self.lock:
            exists = key in self._cache or self._load_state(key) is not None
            return exists, self.version_of(key)

    @abstractmethod
    def search(self, name: str | None, base: BaseModelType | None, model_type: ModelType | None,
               copy: bool = True) -> list[ModelConfigBase]:
        """``copy=False``: the cached objects themselves, for a caller that copies only what it hands out."""

    @abstractmethod
    def by_path(self, path: str) -> list[ModelConfigBase]:
        """Records whose stored path is ``path``, or resolves to where ``path`` resolves."""

    @abstractmethod
    def by_tags(self, tags: Sequence[str]) -> list[ModelConfigBase]: ...

    @abstractmethod
    def count(self) -> int: ...

    def resolve(self, path: str) -> str:
        return resolve_path(path, self.models_dir)

    def close(self) -> None:
        """Release what the projection holds (connections, file locks)."""
