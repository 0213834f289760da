"""The record projection interface: ``events.projection.Projection`` plus the queries the service needs.

``apply`` folds a batch into per-key changes first, then hands them to the backend's ``_commit``,
which writes the rows and the checkpoint in one transaction and skips what it already holds (two
processes sharing one database may both try to apply the same batch).

The fold checks every entry as every reader does (events.validation: its schema, the record config
check, the aggregate's version sequence against the version this projection holds); a refused entry
is handed to ``refuse`` (the store's quarantine) and skipped, so it changes no row and no version.

Parsed configs are cached per key; a cached config is never handed out itself, only a copy, so a
caller mutating what it got cannot corrupt the projection.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from modelbus.events.codec import EventBody
from modelbus.events.logs import get_logger
from modelbus.events.store import BodyBatch, StoredEvent, as_body_batch, position_key
from modelbus.events.validation import Refusal, Refuse, body_problem, schema_problem, version_problem
from modelbus.services.records.enums import BaseModelType, ModelFormat, ModelType
from modelbus.services.records.fold import MODEL_EVENT_TYPES, READS_STATE, State, resolve_path, step
from modelbus.services.records.models import CLASSES_BY_TAG, ModelConfigBase, tag_of
from modelbus.services.records.parsing import config_class

log = get_logger(__name__)

RECORDS_VERSION = "3.2"  # the spec's version() of the record store
KIND = "modelbus-model-records"  # marks our files and tables: anything else is not opened

#: key -> (new state or None when removed, aggregate version)
Changes = dict[str, tuple[State, int]]
_UNREAD: Any = object()  # a key's stored state, not read yet (only these events need it:)
# a rename and the per-model patches change the record they find; an update replaces the config but keeps
# the listing's values (when it was added, its size when the manifest stays)
_READS_STATE = READS_STATE | {"ModelUpdated"}


def _log_refusals(*refusals: Refusal) -> None:
    for r in refusals:
        log.warning("event_skipped", position=r.position, reason=r.reason)


LISTING = "__listing__"  # a stored state's listing values (:class:`Listing`), beside the config's fields


def config_from_state(state: dict[str, Any]) -> ModelConfigBase:
    cls = CLASSES_BY_TAG.get(tag_of(state.get("model_type", ""), state.get("model_format", ""))) \
        or config_class(state)
    if LISTING in state:
        state = {k: v for k, v in state.items() if k != LISTING}
    return cls.model_validate(state)


def copy_config(config: ModelConfigBase) -> ModelConfigBase:
    # a shallow copy with fresh lists: the only mutable fields a config has
    return config.model_copy(update={"tags": list(config.tags), "compatible_bases": list(config.compatible_bases),
                                     "trigger_phrases": list(config.trigger_phrases), "links": list(config.links)})


def listing_order(name: str, key: str) -> tuple[str, str]:
    """The order of a listing page: the name lowered by Python's ``str.lower`` (full Unicode, unlike
    SQLite's ASCII-only NOCASE), then the key. The SQL projection stores the lowered name in a column and
    compares it bytewise, which for UTF-8 is code point order, so both sides agree on every name."""
    return name.lower(), key


class Listing(NamedTuple):
    """What a listing may sort a record by beyond its config: the bytes of its manifest (0 for a record
    without one), and when the log recorded its ``ModelAdded`` and its last change (Unix milliseconds of
    the entries' positions, the log's own clock: a rebuild anywhere gives the same values)."""

    size: int = 0
    added: int = 0
    modified: int = 0


def listing_of(state: dict[str, Any]) -> Listing:
    found = state.get(LISTING)
    return Listing(*found) if found else Listing()


def next_listing(state: State, type_name: str, body: Mapping[str, Any], position: str) -> Listing:
    """The listing values after one event (``state``: the record before it, with its values)."""
    moment = position_key(position)[0]
    before = listing_of(state) if state is not None else None
    files = body.get("files")
    size = sum(int((f.get("size") if isinstance(f, Mapping) else getattr(f, "size", 0)) or 0) for f in files) \
        if isinstance(files, list | tuple) else None  # (None: an update that kept the manifest)
    if type_name == "ModelAdded" or before is None:
        return Listing(size or 0, moment, moment)
    return Listing(before.size if size is None else size, before.added, moment)


#: what a listing may be ordered by -> the record field holding it (then name, then key: a total order,
#: so pages never overlap or skip, whichever direction); size, added and modified are :class:`Listing`'s
ORDER_FIELDS: dict[str, str] = {"name": "name", "type": "model_type", "base": "base_model", "format": "model_format",
                                "size": "size", "added": "added", "modified": "modified"}
LISTING_FIELDS = frozenset(Listing._fields)
DIRECTIONS = ("asc", "desc")


def order_key(state: dict[str, Any], key: str, order_by: str) -> tuple[Any, str, str]:
    """The sort key of a record's stored state in a listing ordered by ``order_by`` (ascending);
    the SQL projection orders by the same three columns, compared bytewise (code point order)."""
    name, _ = listing_order(state["name"], key)
    if order_by == "name":
        return name, name, key
    if order_by in LISTING_FIELDS:
        return getattr(listing_of(state), order_by), name, key
    return str(state[ORDER_FIELDS[order_by]]), name, key


def check_page(offset: int, limit: int) -> None:
    if offset < 0:
        raise ValueError(f"offset={offset!r}: must be >= 0")
    if limit < 0:
        raise ValueError(f"limit={limit!r}: must be >= 0")


def fresh_entries(batch: BodyBatch, checkpoint: str) -> list[EventBody] | None:
    """The entries of a batch strictly after ``checkpoint``; None when the whole batch is applied already
    (an empty list is a batch of other events: only the checkpoint moves)."""
    floor = position_key(checkpoint)
    if position_key(batch.position) <= floor:
        return None
    entries = batch.entries
    if not entries or position_key(entries[0].position) > floor:
        return entries  # the usual case: the whole batch is new
    return [e for e in entries if position_key(e.position) > floor]


class RecordProjection(ABC):
    """A read model of the records. ``lock`` serialises applying and querying within a process."""

    def __init__(self, models_dir: Path | None = None, lock: Any = None) -> None:
        self.models_dir = models_dir
        self.lock = lock if lock is not None else threading.RLock()
        self._cache: dict[str, ModelConfigBase] = {}
        #: the stored rows use an older layout of ours: the service rebuilds them on open
        self.stale = False
        #: where refused entries go (the record service sets its event store's quarantine)
        self.refuse: Refuse = _log_refusals

    # --- the Projection protocol ----------------------------------------------------------------

    @abstractmethod
    def checkpoint(self) -> str: ...

    #: what the runner feeds us (as BodyBatches: see events.projection.Projection)
    event_types = MODEL_EVENT_TYPES

    def apply(self, batch: Sequence[StoredEvent]) -> None:
        if batch:
            self.apply_bodies(as_body_batch(batch, MODEL_EVENT_TYPES))

    def apply_bodies(self, batch: BodyBatch) -> None:
        with self.lock:
            self._commit(batch)

    @abstractmethod
    def reset(self) -> None: ...

    @abstractmethod
    def last_event_id(self) -> str | None:
        """The id of the event at the checkpoint: with it, opening checks the rows came from this log."""

    def fold_batch(self, entries: Iterable[EventBody]) -> Changes:
        return self.fold_entries(entries)[0]

    def fold_entries(self, entries: Iterable[EventBody]) -> tuple[Changes, set[str]]:
        """Per-key outcome of a batch, and the keys it brings in for the first time (no rows yet).
        Entries are checked in log order; the refused ones are handed to :attr:`refuse` and skipped."""
        changes: Changes = {}
        born: set[str] = set()
        refused: list[Refusal] = []
        for entry in entries:
            key = entry.aggregate_id
            current = changes.get(key)
            last = current[1] if current is not None else self._stored_version(key)
            body, reason = self._check(entry, last)
            if body is None:
                refused.append(Refusal(entry.position, entry.type, key, entry.aggregate_version, str(reason)))
                continue
            if current is None:
                if last == 0:
                    born.add(key)
                state: State = _UNREAD
            else:
                state = current[0]
            if state is _UNREAD and entry.type in _READS_STATE:
                state = self._load_state(key)  # a rename keeps the rest, both keep the listing's values
            before = None if state is _UNREAD else state
            after = step(before, entry.type, body)
            if after is not None:
                after[LISTING] = next_listing(before, entry.type, body, entry.position)
            changes[key] = (after, entry.aggregate_version)
            self._cache.pop(key, None)
        if refused:
            self.refuse(*refused)
        return changes, born

    @staticmethod
    def _check(entry: EventBody, last: int) -> tuple[Any, str | None]:
        """(the parsed body, None) when every reader accepts the entry, else (None, why not)."""
        reason = version_problem(last, entry.aggregate_version)
        if reason is not None:
            return None, reason
        try:
            body = entry.parsed()
        except ValueError as exc:
            return None, f"malformed {entry.type} entry ({exc})"
        reason = schema_problem(entry.type, entry.aggregate_id, entry.aggregate_version, body) \
            or body_problem(entry.type, entry.aggregate_id, body)
        return (None, reason) if reason is not None else (body, None)

    @abstractmethod
    def _commit(self, batch: BodyBatch) -> None:
        """Apply the entries after the stored checkpoint and store the batch's position, atomically."""

    @abstractmethod
    def _load_state(self, key: str) -> State: ...

    @abstractmethod
    def _stored_version(self, key: str) -> int:
        """:meth:`version_of` for a caller holding :attr:`lock` (which may not be reentrant)."""

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
    def page(self, name: str | None, base: BaseModelType | None, model_type: ModelType | None,
             tags: Sequence[str], offset: int, limit: int, order_by: str = "name",
             descending: bool = False, *, model_format: ModelFormat | None = None,
             name_contains: str | None = None) -> tuple[int, list[ModelConfigBase]]:
        """The records :meth:`search` finds that also carry every one of ``tags`` (and have ``model_format``,
        and a name holding ``name_contains`` whatever its case, by :func:`listing_order`'s lowering),
        ordered by :func:`order_key` (``order_by`` one of :data:`ORDER_FIELDS`, checked by the service),
        and their number; only the ``limit`` records from ``offset`` on are parsed and copied out."""

    def listing(self, keys: Sequence[str]) -> dict[str, Listing]:
        """The :class:`Listing` values of those of ``keys`` that have a record."""
        with self.lock:
            return {k: listing_of(s) for k in dict.fromkeys(keys) if (s := self._load_state(k)) is not None}

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
