"""ModelRecordServiceBase: the spec's record service, writing events and reading a projection of them.

Writes are optimistic: the event is appended with the aggregate version the projection last saw; if
another writer got there first the store refuses it (ConcurrencyError), we catch up and decide again.
So a duplicate key is found even when our projection was behind, and of two processes racing to add
one key exactly one succeeds. A second model at the same resolved path is refused by the store's
``model-path:`` claim, in the same atomic script as the append.

Reads catch up with the log first, so a read sees every write acknowledged before it began, whichever
process made it; while the log watch (events.watch) vouches that nothing was appended since the last
catch-up, that costs no round trip to Redis.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Self

from modelbus.events.errors import ConcurrencyError, EventStoreError, UniqueConstraintError
from modelbus.events.logs import get_logger
from modelbus.events.projection import ProjectionRunner
from modelbus.events.schema import Event, FileEntry, ModelAdded, ModelRemoved, ModelRenamed, ModelUpdated
from modelbus.events.store import AppendResult, EventStore, StoredEvent, position_key
from modelbus.events.validation import in_sequence
from modelbus.events.watch import LogWatch
from modelbus.services.records.enums import BaseModelType, ModelFormat, ModelType
from modelbus.services.records.errors import (
    MISSING,
    DuplicateModelException,
    EventLogError,
    FieldError,
    InvalidModelConfigException,
    RecordConflictError,
    RecordStoreFormatError,
    UnknownModelException,
)
from modelbus.services.records.fold import fold, is_model_event, path_claim
from modelbus.services.records.modeldata import ModelDataWrites
from modelbus.services.records.models import ModelConfigBase
from modelbus.services.records.parsing import check_key, merge_update, parse_config
from modelbus.services.records.projection import (
    DIRECTIONS,
    ORDER_FIELDS,
    RECORDS_VERSION,
    Listing,
    RecordProjection,
    config_from_state,
)
from modelbus.services.records.validation import validated

log = get_logger(__name__)

WRITE_ATTEMPTS = 16  # optimistic retries before a write gives up under constant contention
RETRY_BACKOFF_BASE = 0.0005  # seconds; the random back-off after a lost race doubles up to the cap
RETRY_BACKOFF_CAP = 0.05
_WHOLE = 2**62  # a page limit beyond any store (SQLite's LIMIT takes a 64-bit integer)


@contextmanager
def _log_errors(doing: str) -> Iterator[None]:
    """Event-store failures reach our callers as our own EventLogError (conflicts are handled before)."""
    try:
        yield
    except EventStoreError as exc:
        raise EventLogError(f"{doing}: {exc}") from exc


def _enum(enum: type[BaseModelType | ModelType | ModelFormat], field: str, value: Any) -> Any:
    if value is None or isinstance(value, enum):
        return value
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(m.value for m in enum)
        raise InvalidModelConfigException([FieldError(field, value, f"must be one of {allowed}")],
                                          "invalid search") from None


def _order(order_by: Any) -> str:
    if order_by not in ORDER_FIELDS:
        raise InvalidModelConfigException(
            [FieldError("order_by", order_by, "must be one of " + ", ".join(ORDER_FIELDS))], "invalid search")
    return str(order_by)


def _direction(direction: Any) -> bool:
    """True for descending."""
    if direction not in DIRECTIONS:
        raise InvalidModelConfigException(
            [FieldError("direction", direction, "must be one of " + ", ".join(DIRECTIONS))], "invalid search")
    return bool(direction == "desc")


class ModelRecordServiceBase(ModelDataWrites):
    """The record service over one projection. Build one with the subclasses' constructors, or
    :meth:`from_db_file` / :meth:`open`, which pick the subclass."""

    #: file suffixes a subclass serves; filled in by subclasses, looked up by from_db_file
    suffixes: ClassVar[tuple[str, ...]] = ()
    #: apply our own writes to the projection before returning (else: at the next read or close)
    apply_on_write: ClassVar[bool] = False
    _by_suffix: ClassVar[dict[str, type[ModelRecordServiceBase]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for suffix in cls.__dict__.get("suffixes", ()):
            ModelRecordServiceBase._by_suffix[suffix] = cls

    def __init__(self, projection: RecordProjection, event_store: EventStore, *, read_tracking: bool = True) -> None:
        self.projection = projection
        self.event_store = event_store
        projection.refuse = event_store.refuse  # what the fold refuses is quarantined (events.validation)
        self.runner = ProjectionRunner(event_store, projection)
        #: seconds a read may skip catching up after the last catch-up (0: every read catches up, the
        #: spec's guarantee). Our own writes are always seen: they force a catch-up while unapplied.
        self.read_staleness = 0.0
        self._last_sync = 0.0
        # tells a read whether the log can have grown since the last catch-up, without asking Redis
        # (events.watch); the lock keeps a read from trusting the silence while another catches up
        self._watch: LogWatch | None = event_store.watch() if read_tracking else None
        self._watch_lock = threading.Lock()
        # keys we appended that the projection has not applied yet -> position of our last event;
        # writes do not wait for the projection, the next read (or write of that key) catches up
        self._unapplied: dict[str, str] = {}
        self._unapplied_lock = threading.Lock()
        self._open_projection()

    def _open_projection(self) -> None:
        """Bring the projection up to date; rebuild it when it cannot be trusted to continue."""
        with _log_errors("opening the record projection"):
            checkpoint = self.projection.checkpoint()
            stale = self.projection.stale
            if stale or not self._from_this_log(checkpoint):
                # an older schema, or rows from a log we are not reading (reset, another namespace)
                log.warning("records_rebuild_on_open", checkpoint=checkpoint, stale_schema=stale)
                self.runner.rebuild()
            else:
                self.runner.catch_up()

    def _from_this_log(self, checkpoint: str) -> bool:
        """Whether the log holds, at the projection's checkpoint, the very event the projection saw last."""
        if checkpoint == "0-0":
            return True
        ms, seq = position_key(checkpoint)
        before = f"{ms}-{seq - 1}" if seq else f"{ms - 1}-{2 ** 64 - 1}"
        # the entry itself, whatever it is: a checkpoint may sit on an entry every reader refused
        found = self.event_store.read_bodies(before, 1, ())
        return found.position == checkpoint and found.event_id == self.projection.last_event_id()

    # --- constructors (the spec's) --------------------------------------------------------------

    @classmethod
    def from_db_file(cls, path: Any, event_store: EventStore | None = None, *,
                     config: Any = None) -> ModelRecordServiceBase:
        """Open (or create) a record store by file extension: ``.db`` SQLite, ``.yaml`` YAML."""
        suffix = Path(path).suffix.lower()
        backend = cls._by_suffix.get(suffix)
        if backend is None:
            known = ", ".join(sorted(cls._by_suffix))
            raise RecordStoreFormatError(f"{path}: unknown record store extension {suffix!r} (use {known})")
        if cls is not ModelRecordServiceBase and not issubclass(backend, cls):
            raise RecordStoreFormatError(f"{path}: a {suffix} file is not a {cls.__name__} store")
        return backend.from_db_file(path, event_store, config=config)

    @classmethod
    def open(cls, config: Any, conn: Any = None, lock: Any = None,
             event_store: EventStore | None = None) -> ModelRecordServiceBase:
        """The spec's four steps: ``model_config_db`` = auto (the shared connection or the main database),
        a path (by extension), or None (the legacy ``conf_path`` YAML)."""
        choice = config.model_config_db
        if choice == "auto":
            sql = cls._by_suffix[".db"]
            if conn is not None and lock is not None:
                return sql.from_connection(conn, lock, event_store, config=config)  # type: ignore[attr-defined]
            return sql.from_db_file(config.db_file, event_store, config=config)
        path = config.resolve(choice) if choice is not None else config.conf_file
        return ModelRecordServiceBase.from_db_file(path, event_store, config=config)

    def close(self) -> None:
        """Apply our own writes to the projection, then release it."""
        try:
            if self._unapplied:
                self.sync()
        finally:
            watch = getattr(self, "_watch", None)  # (absent when __init__ failed before it)
            if watch is not None:
                watch.close()
            self.projection.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the log ----------------------------------------------------------------------------------

    def sync(self) -> str:
        """Catch the projection up with the log; returns its checkpoint."""
        with _log_errors("catching up with the event log"):
            checkpoint = self.runner.catch_up()
        self._last_sync = time.monotonic()
        if self._unapplied:
            reached = position_key(checkpoint)
            with self._unapplied_lock:
                for key, position in list(self._unapplied.items()):
                    if position_key(position) <= reached:
                        del self._unapplied[key]
        return checkpoint

    def _sync_for_read(self) -> None:
        if self.read_staleness > 0 and not self._unapplied \
                and time.monotonic() - self._last_sync < self.read_staleness:
            return
        watch = self._watch
        if watch is None:
            self.sync()
            return
        with self._watch_lock:
            if not self._unapplied and watch.quiet():
                return
            watch.arm()  # before reading the log: an append from now on breaks the silence again
            self.sync()

    def _sync_for_write(self, key: str) -> None:
        if key in self._unapplied:
            self.sync()

    def rebuild(self) -> str:
        """Throw the projection away and replay the whole log into it."""
        log.info("records_rebuild", store=type(self).__name__)
        with _log_errors("rebuilding the record projection"):
            return self.runner.rebuild()

    def history(self, key: str) -> list[StoredEvent]:
        """Every event of one model, oldest first (removed models keep their history)."""
        with _log_errors(f"reading the history of {key!r}"):
            events = in_sequence((s for s in self.event_store.history(key) if is_model_event(s.event)),
                                 self.event_store.refuse)
        if not events:
            raise UnknownModelException(f"no model with key {key!r} was ever recorded")
        return events

    def get_model_at(self, key: str, position: str | None = None, time: datetime | None = None) -> ModelConfigBase:
        """The model's config as it was at a log position and/or a moment (time travel)."""
        state = fold(self.history(key), position=position, time=time)
        if state is None:
            when = " and ".join(x for x in (position and f"position {position}", time and f"time {time}") if x)
            raise UnknownModelException(f"model {key!r} did not exist at {when or 'the end of the log'}")
        return config_from_state(state)

    # --- reads --------------------------------------------------------------------------------------

    def version(self) -> str:
        return RECORDS_VERSION

    def get_model(self, key: str) -> ModelConfigBase:
        self._sync_for_read()
        found = self.projection.get(key)
        if found is None:
            raise UnknownModelException(f"unknown model key {key!r}")
        return found

    def exists(self, key: str) -> bool:
        self._sync_for_read()
        return self.projection.get(key) is not None

    def search_by_path(self, path: Any) -> ModelConfigBase:
        """The model stored at ``path`` (compared as text, after resolving relative paths)."""
        self._sync_for_read()
        found = self.projection.by_path(str(path))
        if not found:
            raise UnknownModelException(f"no model at path {str(path)!r}")
        return found[0]

    def search_by_name(self, name: str | None = None, base_model: BaseModelType | str | None = None,
                       model_type: ModelType | str | None = None, *, order_by: str | None = None,
                       direction: str = "asc") -> list[ModelConfigBase]:
        """Models matching every criterion given; a base matches the primary base or a compatible one.
        ``order_by`` (name, type, base, format, size, added, modified) and ``direction`` (asc, desc) sort
        them as :meth:`search_page` does; without ``order_by`` they come in no particular order."""
        base = _enum(BaseModelType, "base_model", base_model)
        type_ = _enum(ModelType, "model_type", model_type)
        descending = _direction(direction)
        field = _order(order_by) if order_by is not None else None
        self._sync_for_read()
        if field is None:
            return self.projection.search(name, base, type_)
        # the projection orders (it holds the listing values a config lacks): one page of everything
        return self.projection.page(name, base, type_, (), 0, _WHOLE, field, descending)[1]

    def all_models(self, *, order_by: str | None = None, direction: str = "asc") -> list[ModelConfigBase]:
        return self.search_by_name(order_by=order_by, direction=direction)

    def search_page(self, name: str | None = None, base_model: BaseModelType | str | None = None,
                    model_type: ModelType | str | None = None, tags: Sequence[str] = (), *, offset: int = 0,
                    limit: int = 100, order_by: str = "name", direction: str = "asc",
                    model_format: ModelFormat | str | None = None, name_contains: str | None = None,
                    ) -> tuple[int, list[ModelConfigBase]]:
        """One page of :meth:`search_by_name`, filtered by all ``tags``, and the total. Ordered by
        ``order_by`` (name, type, base, format; size: the bytes of the install's manifest; added, modified:
        when the log recorded the record's add and its last change; then the lowered name, then the key: a
        total order, so pages neither overlap nor skip) in ``direction`` (asc or desc). ``model_format`` and
        ``name_contains`` (part of the name, any case) narrow it further. The projection filters, orders
        and cuts the page itself (in SQL for SQLite), so only the page's records are read and copied out."""
        base = _enum(BaseModelType, "base_model", base_model)
        type_ = _enum(ModelType, "model_type", model_type)
        sort_field, descending = _order(order_by), _direction(direction)
        for field, value in (("offset", offset), ("limit", limit)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidModelConfigException([FieldError(field, value, "must be an integer >= 0")],
                                                  "invalid search")
        self._sync_for_read()
        return self.projection.page(name, base, type_, list(tags), offset, limit, sort_field, descending,
                                    model_format=_enum(ModelFormat, "model_format", model_format),
                                    name_contains=name_contains or None)

    def listing(self, keys: Sequence[str]) -> dict[str, Listing]:
        """What a listing sorts records by beyond their configs (:class:`~.projection.Listing`: the bytes
        of the install's manifest, the log's milliseconds of the add and of the last change), for those
        of ``keys`` that have a record."""
        self._sync_for_read()
        return self.projection.listing(list(keys))

    def search_by_tag(self, tags: Sequence[str]) -> list[ModelConfigBase]:
        """Models carrying all of ``tags``."""
        if isinstance(tags, str):
            tags = [tags]
        self._sync_for_read()
        return self.projection.by_tags(list(tags)) if tags else self.projection.search(None, None, None)

    def model_info_by_name(self, model_name: str, base_model: BaseModelType | str,
                           model_type: ModelType | str) -> ModelConfigBase:
        """The one model with this name, base and type (a primary-base match wins over a compatible one)."""
        found = self.search_by_name(model_name, base_model, model_type)
        primary = [c for c in found if c.base_model == _enum(BaseModelType, "base_model", base_model)]
        found = primary or found
        what = f"{model_name!r} (base {base_model!s}, type {model_type!s})"
        if not found:
            raise UnknownModelException(f"no model named {what}")
        if len(found) > 1:
            keys = ", ".join(c.key for c in found)
            raise DuplicateModelException(f"{len(found)} models named {what}: {keys}; use get_model(key)")
        return found[0]

    # --- writes -------------------------------------------------------------------------------------

    def add_model(self, key: str, config: ModelConfigBase | Mapping[str, Any], *,
                  correlation_id: str | None = None, idempotency_key: str | None = None,
                  files: Sequence[FileEntry] = ()) -> ModelConfigBase:
        """Record a new model; ``files`` is its manifest (services.install.manifest), kept in the event."""
        record = parse_config(config, key=check_key(key))
        claim = path_claim(self.projection.resolve(record.path))
        body = record.model_dump(mode="json")
        # a retried command (same idempotency key) may find its own earlier add: ask the store once
        replay = [True] if idempotency_key is not None else []

        def attempt() -> ModelConfigBase | None:
            self._sync_for_write(key)
            exists, expected = self.projection.presence(key)
            if exists:
                if not replay:
                    raise DuplicateModelException(f"a model with key {key!r} already exists")
                replay.clear()
                expected = -1  # no version matches: the store answers "duplicate" for our key, or refuses
            event = ModelAdded(aggregate_id=key, config=body, files=tuple(files), correlation_id=correlation_id)
            validated(event.config)  # the record's own dump: the append need not validate it again
            result = self._append(event, claims={claim: key}, idempotency_key=idempotency_key,
                                  path=record.path, expected=expected)
            if result is None:
                return None
            log.debug("model_added", key=key, name=record.name, path=record.path, position=result.positions[-1])
            return self.get_model(key) if result.duplicate else record
        return self._retry(attempt, key)

    def update_model(self, key: str, config: ModelConfigBase | Mapping[str, Any], *,
                     correlation_id: str | None = None, files: Sequence[FileEntry] | None = None) -> ModelConfigBase:
        """Apply a sparse dict of changes, or replace the record with a whole config; ``files`` replaces the
        manifest (when the path moved: services.install checks the new path and hashes it)."""
        def attempt() -> ModelConfigBase | None:
            current = self._current(key)
            updated, changes = merge_update(current, config)
            if not changes:
                return updated
            old_claim = path_claim(self.projection.resolve(current.path))
            new_claim = path_claim(self.projection.resolve(updated.path))
            moved = old_claim != new_claim
            event = ModelUpdated(aggregate_id=key, changes=changes, config=updated.model_dump(mode="json"),
                                 files=None if files is None else tuple(files), correlation_id=correlation_id)
            result = self._append(event, claims={new_claim: key} if moved else None,
                                  releases=[old_claim] if moved else (), path=updated.path)
            if result is None:
                return None
            log.debug("model_updated", key=key, fields=sorted(changes), position=result.positions[-1])
            return updated
        return self._retry(attempt, key)

    def rename_model(self, key: str, new_name: str | Mapping[str, Any], *,
                     correlation_id: str | None = None) -> ModelConfigBase:
        """Change the model's name: ``rename_model(key, "new")`` or, as the spec writes it,
        ``rename_model(key, {"name": "new"})`` (a dict holding anything but ``name`` is refused)."""
        if isinstance(new_name, Mapping):
            others = [FieldError(str(k), v, "rename_model changes only the name (use update_model)")
                      for k, v in new_name.items() if k != "name"]
            if others:
                raise InvalidModelConfigException(others, "invalid rename")
            new_name = new_name.get("name", MISSING)
        if not isinstance(new_name, str) or not new_name.strip():
            raise InvalidModelConfigException([FieldError("name", new_name, "must be a non-empty string")])

        def attempt() -> ModelConfigBase | None:
            current = self._current(key)
            if current.name == new_name:
                return current
            event = ModelRenamed(aggregate_id=key, old_name=current.name, new_name=new_name,
                                 correlation_id=correlation_id)
            if self._append(event) is None:
                return None
            log.debug("model_renamed", key=key, old=current.name, new=new_name)
            return current.model_copy(update={"name": new_name})
        return self._retry(attempt, key)

    def del_model(self, key: str, *, correlation_id: str | None = None) -> None:
        def attempt() -> bool | None:
            current = self._current(key)
            event = ModelRemoved(aggregate_id=key, path=current.path, correlation_id=correlation_id)
            if self._append(event, releases=[path_claim(self.projection.resolve(current.path))]) is None:
                return None
            log.debug("model_removed", key=key, path=current.path)
            return True
        self._retry(attempt, key)
        self.drop_links_to(key, correlation_id)  # (a link left by a crash here shows as a dangling key)

    # --- write plumbing -----------------------------------------------------------------------------

    def _current(self, key: str) -> ModelConfigBase:
        self._sync_for_write(key)
        found = self.projection.get(key)
        if found is None:
            self.sync()  # perhaps only we have not seen it yet
            found = self.projection.get(key)
        if found is None:
            raise UnknownModelException(f"unknown model key {key!r}")
        return found

    def _append(self, event: Event, *, claims: Mapping[str, str] | None = None, releases: Sequence[str] = (),
                idempotency_key: str | None = None, path: str | None = None,
                expected: int | None = None) -> AppendResult | None:
        """Append at the version we saw; ``None`` when someone else wrote first (then: retry)."""
        key = event.aggregate_id
        if expected is None:
            expected = self.projection.version_of(key)
        try:
            result = self.event_store.append([event], expected_version=expected,
                                             idempotency_key=idempotency_key, claims=claims, releases=releases)
        except ConcurrencyError:
            self.sync()
            return None
        except UniqueConstraintError as exc:
            raise DuplicateModelException(
                f"path {path!r} is already used by model {exc.owner!r} (a second model at one path)") from None
        except EventStoreError as exc:
            raise EventLogError(f"appending {event.type} for {key!r}: {exc}") from exc
        with self._unapplied_lock:
            self._unapplied[key] = result.positions[-1]  # our next read catches up past it
        if self.apply_on_write:
            self.sync()
        return result

    def _retry(self, attempt: Any, key: str) -> Any:
        for n in range(WRITE_ATTEMPTS):
            outcome = attempt()
            if outcome is not None:
                return outcome
            # lost a race: back off a little, at random, so contenders stop colliding in lockstep
            time.sleep(random.uniform(0, min(RETRY_BACKOFF_CAP, RETRY_BACKOFF_BASE * 2 ** n)))
        raise RecordConflictError(f"model {key!r} kept changing under {WRITE_ATTEMPTS} write attempts")
