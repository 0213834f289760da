"""The SQLite projection: indexed columns for the searches, the whole config as JSON, the checkpoint.

Tables carry a ``model_record`` prefix because ``from_connection`` shares the application's main
database. Each batch is one ``BEGIN IMMEDIATE`` transaction that re-reads the checkpoint first, so
two processes applying the same batch to one file apply it once.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from modelbus.events.codec import EventBody
from modelbus.events.store import BodyBatch
from modelbus.services.records.enums import BaseModelType, ModelFormat, ModelType
from modelbus.services.records.errors import RecordStoreFormatError
from modelbus.services.records.fold import State
from modelbus.services.records.models import CLASSES_BY_TAG, ModelConfigBase, tag_of
from modelbus.services.records.projection import (
    KIND,
    LISTING,
    RECORDS_VERSION,
    Changes,
    Listing,
    RecordProjection,
    check_page,
    copy_config,
    fresh_entries,
    listing_of,
    listing_order,
)

# 2: the key tables are WITHOUT ROWID (one B-tree each instead of two); 3: sort_name and its index;
# 4: the listing values (size, added, modified) and their order indexes
SCHEMA = 4
META = "model_record_meta"

DDL = f"""
CREATE TABLE IF NOT EXISTS {META} (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS model_records (
    key TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    -- the listing order's name (projection.listing_order): Python's lower(), compared bytewise
    sort_name TEXT NOT NULL,
    base TEXT NOT NULL,
    type TEXT NOT NULL,
    format TEXT NOT NULL,
    path TEXT NOT NULL,
    resolved_path TEXT NOT NULL,
    hash TEXT,
    -- projection.Listing: manifest bytes, and the log's milliseconds of the add and of the last change
    size INTEGER NOT NULL,
    added INTEGER NOT NULL,
    modified INTEGER NOT NULL,
    -- the config alone (the listing values are the columns above)
    config TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS model_records_name ON model_records(name);
-- a listing page walks this from its offset instead of sorting every match
CREATE INDEX IF NOT EXISTS model_records_order ON model_records(sort_name, key);
CREATE INDEX IF NOT EXISTS model_records_order_size ON model_records(size, sort_name, key);
CREATE INDEX IF NOT EXISTS model_records_order_added ON model_records(added, sort_name, key);
CREATE INDEX IF NOT EXISTS model_records_order_modified ON model_records(modified, sort_name, key);
CREATE INDEX IF NOT EXISTS model_records_base ON model_records(base);
CREATE INDEX IF NOT EXISTS model_records_type ON model_records(type);
CREATE INDEX IF NOT EXISTS model_records_format ON model_records(format);
CREATE INDEX IF NOT EXISTS model_records_path ON model_records(path);
CREATE INDEX IF NOT EXISTS model_records_resolved_path ON model_records(resolved_path);
CREATE INDEX IF NOT EXISTS model_records_hash ON model_records(hash);
CREATE TABLE IF NOT EXISTS model_record_tags (tag TEXT NOT NULL, key TEXT NOT NULL, PRIMARY KEY (tag, key))
    WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS model_record_tags_key ON model_record_tags(key);
-- every base a model serves: the primary one and its compatible bases
CREATE TABLE IF NOT EXISTS model_record_bases (base TEXT NOT NULL, key TEXT NOT NULL, PRIMARY KEY (base, key))
    WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS model_record_bases_key ON model_record_bases(key);
-- aggregate versions, removed records included: the expected version of the next write
CREATE TABLE IF NOT EXISTS model_record_versions (key TEXT PRIMARY KEY, version INTEGER NOT NULL) WITHOUT ROWID;
"""
TABLES = ("model_records", "model_record_tags", "model_record_bases", "model_record_versions")
# the secondary indexes, dropped while a rebuild fills the tables and built again after
INDEXES = tuple(re.findall(r"CREATE INDEX IF NOT EXISTS (\w+)", DDL))


class _Pending:
    """A rebuild's records so far: the final state and version of every key, and where the log was read to."""

    def __init__(self) -> None:
        self.changes: Changes = {}
        self.position = "0-0"
        self.event_id: str | None = None

    def add(self, batch: BodyBatch, fold: Callable[[list[EventBody]], Changes]) -> None:
        fresh = fresh_entries(batch, self.position)
        if fresh is not None:
            self.changes.update(fold(fresh))
            self.position, self.event_id = batch.position, batch.event_id

_SELECT = "SELECT type, format, config, key FROM model_records"
#: projection.ORDER_FIELDS -> the column holding it (the only names that reach an ORDER BY)
_ORDER_COLUMNS = {"type": "type", "base": "base", "format": "format", "size": "size", "added": "added",
                  "modified": "modified"}


def inspect_schema(conn: sqlite3.Connection, where: str) -> str:
    """``"empty"``, ``"current"`` or ``"stale"`` (ours, older schema); RecordStoreFormatError if foreign."""
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as exc:
        raise RecordStoreFormatError(f"{where}: not an SQLite database ({exc})") from None
    if META not in tables:
        return "empty"
    meta = dict(conn.execute(f"SELECT name, value FROM {META}").fetchall())
    if meta.get("kind") != KIND or meta.get("version") != RECORDS_VERSION:
        raise RecordStoreFormatError(
            f"{where}: model record tables of kind {meta.get('kind')!r} version {meta.get('version')!r}, "
            f"expected {KIND} {RECORDS_VERSION}")
    return "current" if meta.get("schema") == str(SCHEMA) else "stale"


class SQLProjection(RecordProjection):
    def __init__(self, conn: sqlite3.Connection, lock: Any = None, models_dir: Path | None = None,
                 where: str = "<connection>") -> None:
        super().__init__(models_dir, lock)
        self.conn = conn
        self.where = where
        self._seen = "0-0"  # the checkpoint our cache reflects
        self._bulk: _Pending | None = None  # inside bulk_load: what the batches folded so far
        with self.lock:
            state = inspect_schema(conn, where)
            self.stale = state == "stale"
            if state == "empty" or self.stale:
                with self._transaction():
                    self._create()

    def _create(self) -> None:
        if self.stale:
            for table in TABLES:
                self.conn.execute(f"DROP TABLE IF EXISTS {table}")
        self._apply_ddl()
        rows = [("kind", KIND), ("version", RECORDS_VERSION), ("schema", str(SCHEMA))]
        self.conn.executemany(f"INSERT OR REPLACE INTO {META}(name, value) VALUES (?, ?)", rows)
        if self.stale:
            self.conn.execute(f"DELETE FROM {META} WHERE name IN ('checkpoint', 'last_event')")

    def _apply_ddl(self) -> None:
        """Create what is missing of the tables and indexes (every statement is IF NOT EXISTS)."""
        for statement in DDL.split(";"):
            if statement.strip():
                self.conn.execute(statement)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        if self._bulk is not None:
            yield  # inside bulk_load: its one transaction commits or rolls back everything
            return
        # IMMEDIATE takes the write lock up front, so the checkpoint read inside stays true until commit
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.rollback()
            raise
        self.conn.commit()

    @contextmanager
    def bulk_load(self) -> Iterator[None]:
        """A full rebuild as one transaction without syncs: readers keep seeing the old rows until the
        new ones are complete, and a crash leaves the old rows (the log is the truth: nothing to lose).

        Batches are folded in memory (the final state of every record, the size of the projection
        itself) and each record is written once at the end, in key order, into tables without indexes;
        the indexes are built after: far less B-tree work than keeping them current batch by batch."""
        with self.lock:
            stale = self.stale
            synchronous = self.conn.execute("PRAGMA synchronous").fetchone()[0]
            if not self.conn.in_transaction:  # (a shared connection may be inside the caller's transaction)
                self.conn.execute("PRAGMA synchronous=OFF")
            try:
                with self._transaction():
                    # inside the transaction, so a failed rebuild rolls the drop back too
                    for index in INDEXES:
                        self.conn.execute(f"DROP INDEX IF EXISTS {index}")
                    self._bulk = _Pending()
                    try:
                        yield
                        self._write_pending(self._bulk)
                    finally:
                        self._bulk = None
                    self._apply_ddl()
            except BaseException:
                self._cache.clear()  # rows rolled back: drop what was parsed from them
                self._seen = self._read_checkpoint()
                self.stale = stale
                raise
            finally:
                if not self.conn.in_transaction:
                    self.conn.execute(f"PRAGMA synchronous={int(synchronous)}")

    def _write_pending(self, pending: _Pending) -> None:
        if pending.event_id is None and pending.position == "0-0":
            return  # an empty log: nothing read
        self._write_rows(dict(sorted(pending.changes.items())))
        self._write_checkpoint(pending.position, pending.event_id)

    def _read_checkpoint(self) -> str:
        row = self.conn.execute(f"SELECT value FROM {META} WHERE name = 'checkpoint'").fetchone()
        return row[0] if row else "0-0"

    def last_event_id(self) -> str | None:
        with self.lock:
            row = self.conn.execute(f"SELECT value FROM {META} WHERE name = 'last_event'").fetchone()
            return row[0] if row else None

    def checkpoint(self) -> str:
        with self.lock:
            position = self._read_checkpoint()
            if position != self._seen:
                # another connection moved the table on: our parsed configs may be out of date
                self._cache.clear()
                self._seen = position
            return position

    def _commit(self, batch: BodyBatch) -> None:
        if self._bulk is not None:
            self._bulk.add(batch, self.fold_batch)
            return
        with self._transaction():
            fresh = fresh_entries(batch, self._read_checkpoint())
            if fresh is None:
                return
            changes, born = self.fold_entries(fresh)
            # a key this batch brings in has no rows yet: nothing to delete
            gone = [(k,) for k in changes if k not in born]
            for table in ("model_records", "model_record_tags", "model_record_bases"):
                self.conn.executemany(f"DELETE FROM {table} WHERE key = ?", gone)
            self._write_rows(changes)
            self._write_checkpoint(batch.position, batch.event_id)

    def _write_rows(self, changes: Changes) -> None:
        """Insert the rows of changed records (their old rows are gone already) and every version."""
        rows, tags, bases = [], [], []
        for key, (state, _) in changes.items():
            if state is None:
                continue
            config = {k: v for k, v in state.items() if k != LISTING}
            rows.append((key, state["name"], listing_order(state["name"], key)[0], state["base_model"],
                         state["model_type"], state["model_format"], state["path"], self.resolve(state["path"]),
                         state.get("hash"), *listing_of(state), orjson.dumps(config).decode()))
            tags += [(tag, key) for tag in dict.fromkeys(state.get("tags") or ())]
            bases += [(b, key) for b in dict.fromkeys([state["base_model"], *(state.get("compatible_bases") or ())])]
        self.conn.executemany("INSERT INTO model_records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        self.conn.executemany("INSERT INTO model_record_tags VALUES (?, ?)", tags)
        self.conn.executemany("INSERT INTO model_record_bases VALUES (?, ?)", bases)
        self.conn.executemany("INSERT OR REPLACE INTO model_record_versions VALUES (?, ?)",
                              [(k, v) for k, (_, v) in changes.items()])

    def _write_checkpoint(self, position: str, event_id: str | None) -> None:
        self.conn.executemany(f"INSERT OR REPLACE INTO {META}(name, value) VALUES (?, ?)",
                              [("checkpoint", position), ("last_event", event_id or "")])
        self._seen = position

    def reset(self) -> None:
        with self.lock, self._transaction():
            for table in TABLES:
                self.conn.execute(f"DELETE FROM {table}")
            self.conn.execute(f"DELETE FROM {META} WHERE name IN ('checkpoint', 'last_event')")
            self._cache.clear()
            self._seen = "0-0"
            self.stale = False

    # --- queries --------------------------------------------------------------------------------

    def _load_state(self, key: str) -> State:
        if self._bulk is not None:  # a rebuild: the rows are still in memory
            found = self._bulk.changes.get(key)
            return None if found is None else found[0]
        row = self.conn.execute("SELECT config, size, added, modified FROM model_records WHERE key = ?",
                                (key,)).fetchone()
        if row is None:
            return None
        state: dict[str, Any] = orjson.loads(row[0])
        state[LISTING] = Listing(*row[1:])
        return state

    def get(self, key: str, copy: bool = True) -> ModelConfigBase | None:
        with self.lock:
            cached = self._cache.get(key)
            if cached is not None:
                return copy_config(cached) if copy else cached
            row = self.conn.execute(_SELECT + " WHERE key = ?", (key,)).fetchone()
            return None if row is None else self._parse(row, copy)

    def _parse(self, row: tuple[str, str, str, str], copy: bool = True) -> ModelConfigBase:
        cached = self._cache.get(row[3])
        if cached is None:
            cached = self._cache[row[3]] = CLASSES_BY_TAG[tag_of(row[0], row[1])].model_validate_json(row[2])
        return copy_config(cached) if copy else cached

    def _query(self, sql: str, params: Sequence[Any], copy: bool = True) -> list[ModelConfigBase]:
        with self.lock:
            return [self._parse(row, copy) for row in self.conn.execute(sql + " ORDER BY name, key", params)]

    def presence(self, key: str) -> tuple[bool, int]:
        # one statement instead of two on every add: a record always has its version row
        with self.lock:
            row = self.conn.execute(
                "SELECT version, EXISTS(SELECT 1 FROM model_records r WHERE r.key = v.key) "
                "FROM model_record_versions v WHERE key = ?", (key,)).fetchone()
            return (False, 0) if row is None else (bool(row[1]), int(row[0]))

    def version_of(self, key: str) -> int:
        with self.lock:
            return self._stored_version(key)

    def _stored_version(self, key: str) -> int:
        if self._bulk is not None:  # a rebuild: the versions are still in memory
            found = self._bulk.changes.get(key)
            return 0 if found is None else found[1]
        row = self.conn.execute("SELECT version FROM model_record_versions WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def search(self, name: str | None, base: BaseModelType | None, model_type: ModelType | None,
               copy: bool = True) -> list[ModelConfigBase]:
        where, params = _filters(name, base, model_type, ())
        return self._query(_SELECT + where, params, copy)

    def page(self, name: str | None, base: BaseModelType | None, model_type: ModelType | None,
             tags: Sequence[str], offset: int, limit: int, order_by: str = "name",
             descending: bool = False, *, model_format: ModelFormat | None = None,
             name_contains: str | None = None) -> tuple[int, list[ModelConfigBase]]:
        check_page(offset, limit)
        way = "DESC" if descending else "ASC"
        order = f"sort_name {way}, key {way}"  # projection.order_key, column by column
        if order_by != "name":
            order = f"{_ORDER_COLUMNS[order_by]} {way}, {order}"
        where, params = _filters(name, base, model_type, tags, model_format, name_contains)
        with self.lock, self._snapshot():
            total = int(self.conn.execute("SELECT COUNT(*) FROM model_records" + where, params).fetchone()[0])
            if limit == 0 or offset >= total:
                return total, []
            # keys only: the order index covers them, and a sort (after a type or name filter) carries no JSON
            keys = self.conn.execute("SELECT key FROM model_records" + where
                                     + f" ORDER BY {order} LIMIT ? OFFSET ?", [*params, limit, offset])
            return total, [c for c in (self.get(k) for (k,) in keys.fetchall()) if c is not None]

    @contextmanager
    def _snapshot(self) -> Iterator[None]:
        """One read transaction, so a count and the page after it see the same rows even while another
        process writes the file (WAL readers keep their snapshot)."""
        if self.conn.in_transaction or self._bulk is not None:
            yield  # the caller's (or bulk_load's) transaction already holds one view
            return
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            self.conn.rollback()  # nothing was written: ending the read is all that is left

    def listing(self, keys: Sequence[str]) -> dict[str, Listing]:
        # the columns alone: no config is read or parsed
        wanted = list(dict.fromkeys(keys))
        found: dict[str, Listing] = {}
        with self.lock:
            for i in range(0, len(wanted), 500):  # (SQLite's bound-parameter limit)
                chunk = wanted[i:i + 500]
                rows = self.conn.execute("SELECT key, size, added, modified FROM model_records WHERE key IN ("
                                         + ", ".join("?" * len(chunk)) + ")", chunk)
                found.update((row[0], Listing(*row[1:])) for row in rows)
        return {k: found[k] for k in wanted if k in found}

    def by_path(self, path: str) -> list[ModelConfigBase]:
        return self._query(_SELECT + " WHERE path = ? OR resolved_path = ?", (path, self.resolve(path)))

    def by_tags(self, tags: Sequence[str]) -> list[ModelConfigBase]:
        wanted = list(dict.fromkeys(tags))
        marks = ", ".join("?" * len(wanted))
        sql = (_SELECT + f" WHERE key IN (SELECT key FROM model_record_tags WHERE tag IN ({marks})"
               " GROUP BY key HAVING COUNT(*) = ?)")
        return self._query(sql, [*wanted, len(wanted)])

    def count(self) -> int:
        with self.lock:
            return int(self.conn.execute("SELECT COUNT(*) FROM model_records").fetchone()[0])


def _filters(name: str | None, base: BaseModelType | None, model_type: ModelType | None,
             tags: Sequence[str], model_format: ModelFormat | None = None,
             name_contains: str | None = None) -> tuple[str, list[Any]]:
    """The WHERE clause (with its leading space, empty without filters) of a search and its parameters."""
    where: list[str] = []
    params: list[Any] = []
    if model_format is not None:
        where.append("format = ?")
        params.append(model_format.value)
    if name_contains:
        where.append("instr(sort_name, ?) > 0")  # sort_name is Python's lowering: the same as the memory side
        params.append(name_contains.lower())
    if name is not None:
        where.append("name = ?")
        params.append(name)
    if model_type is not None:
        where.append("type = ?")
        params.append(model_type.value)
    if base is not None:
        # correlated EXISTS: the planner starts from the name index and probes (base, key)
        where.append("EXISTS (SELECT 1 FROM model_record_bases b WHERE b.base = ? AND b.key = model_records.key)")
        params.append(base.value)
    for tag in dict.fromkeys(tags):
        # one EXISTS per tag rather than by_tags's GROUP BY: a page then walks the order index and stops
        # after offset + limit matches, where the key set of a tag most records carry would be sorted whole
        where.append("EXISTS (SELECT 1 FROM model_record_tags t WHERE t.tag = ? AND t.key = model_records.key)")
        params.append(tag)
    return (" WHERE " + " AND ".join(where) if where else ""), params
