"""The three record services: SQLite, YAML file and in-memory projections of one event log.

Each finds its event log through the configuration when none is given
(``RedisEventStore.from_config``: ``MODELBUS_REDIS_URL`` or the embedded Redis, ``MODELBUS_NAMESPACE``).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

from modelbus.events.store import EventStore, RedisEventStore
from modelbus.services.config import AppConfig
from modelbus.services.records.errors import RecordStoreFormatError
from modelbus.services.records.memory_projection import MemoryProjection
from modelbus.services.records.service import ModelRecordServiceBase
from modelbus.services.records.sql_projection import META, SQLProjection

BUSY_TIMEOUT_MS = 30_000  # other processes applying a batch to the same file hold its write lock briefly


def _context(config: Any, event_store: EventStore | None) -> tuple[Any, EventStore, Path | None]:
    config = config if config is not None else AppConfig.load()
    store = event_store if event_store is not None else RedisEventStore.from_config(config)
    models_dir = getattr(config, "models_path", None)
    return config, store, models_dir


def _read_tracking(config: Any) -> bool:
    return bool(getattr(config, "records_read_tracking", True))


def _check_own_database(path: Path) -> None:
    """An existing database file must be a record store already (the spec: "does not contain the
    expected schema metainformation" is an AssertionError). Looked at read-only, so a refused file is
    left exactly as it was; sharing another application's database is what from_connection is for."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise RecordStoreFormatError(f"{path}: cannot be opened as an SQLite database ({exc})") from None
    try:
        tables = sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'"))
    except sqlite3.DatabaseError as exc:
        raise RecordStoreFormatError(f"{path}: not an SQLite database ({exc})") from None
    finally:
        conn.close()
    if tables and META not in tables:
        shown = ", ".join(tables[:5]) + (f" and {len(tables) - 5} more" if len(tables) > 5 else "")
        raise RecordStoreFormatError(
            f"{path}: an SQLite database without modelbus's schema metainformation (no {META} table; "
            f"it holds {shown}); not opening it as a record store (use from_connection to share a database)")


class ModelRecordServiceSQL(ModelRecordServiceBase):
    """Records in SQLite: its own database file, or tables in the application's shared connection."""

    suffixes = (".db", ".sqlite", ".sqlite3")

    def __init__(self, projection: SQLProjection, event_store: EventStore, *, owns_connection: bool = False,
                 read_tracking: bool = True) -> None:
        self._owns_connection = owns_connection
        try:
            super().__init__(projection, event_store, read_tracking=read_tracking)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_connection(cls, conn: sqlite3.Connection, lock: Any, event_store: EventStore | None = None, *,
                        config: Any = None) -> ModelRecordServiceSQL:
        """Keep the records in an already open database, guarded by the caller's lock."""
        config, store, models_dir = _context(config, event_store)
        return cls(SQLProjection(conn, lock, models_dir, where="<shared connection>"), store,
                   read_tracking=_read_tracking(config))

    @classmethod
    def from_db_file(cls, path: Any, event_store: EventStore | None = None, *,
                     config: Any = None) -> ModelRecordServiceSQL:
        path = Path(path)
        if path.suffix.lower() not in cls.suffixes:
            raise RecordStoreFormatError(f"{path}: an SQLite record store needs a .db file name")
        if path.is_dir():
            raise RecordStoreFormatError(f"{path}: is a directory, not an SQLite database")
        if path.exists() and path.stat().st_size > 0:
            # read by SQLite itself, never by a plain open(): closing any descriptor of the file drops every
            # POSIX lock this process holds on it, those of its other connections to the file too
            _check_own_database(path)
        config, store, models_dir = _context(config, event_store)
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            # WAL: readers never wait for the writer; NORMAL: no fsync per commit (the log is the truth,
            # a lost tail of the projection is replayed from it)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            projection = SQLProjection(conn, threading.RLock(), models_dir, where=str(path))
        except BaseException:
            conn.close()
            raise
        return cls(projection, store, owns_connection=True, read_tracking=_read_tracking(config))

    @property
    def conn(self) -> sqlite3.Connection:
        return self.projection.conn  # type: ignore[attr-defined,no-any-return]

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._owns_connection:
                self.projection.conn.close()  # type: ignore[attr-defined]
                self._owns_connection = False


class ModelRecordServiceFile(ModelRecordServiceBase):
    """Records in a YAML file (InvokeAI's models.yaml layout with our header), rewritten atomically."""

    suffixes = (".yaml", ".yml")
    apply_on_write = True  # people read and diff this file: keep it current with every write

    @classmethod
    def from_db_file(cls, path: Any, event_store: EventStore | None = None, *,
                     config: Any = None) -> ModelRecordServiceFile:
        path = Path(path)
        if path.suffix.lower() not in cls.suffixes:
            raise RecordStoreFormatError(f"{path}: a YAML record store needs a .yaml file name")
        if path.is_dir():
            raise RecordStoreFormatError(f"{path}: is a directory, not a YAML record file")
        from modelbus.services.records.yaml_projection import YamlProjection  # (YAML: only for this store)
        config, store, models_dir = _context(config, event_store)
        projection = YamlProjection(path, models_dir)
        projection.ensure_file()
        return cls(projection, store, read_tracking=_read_tracking(config))

    @property
    def path(self) -> Path:
        return self.projection.path  # type: ignore[attr-defined,no-any-return]


class ModelRecordServiceMemory(ModelRecordServiceBase):
    """Records in this process's memory, replayed from the log at start: for tools, tests and workers
    that only need to read."""

    def __init__(self, event_store: EventStore | None = None, *, config: Any = None) -> None:
        config, store, models_dir = _context(config, event_store)
        super().__init__(MemoryProjection(models_dir), store, read_tracking=_read_tracking(config))
