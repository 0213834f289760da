"""The YAML projection: the records kept in memory and rewritten atomically (temp file + rename).

Layout (InvokeAI's models.yaml shape, plus our header)::

    __metadata__:
      version: '3.2'
      kind: modelbus-model-records
      schema: 1
      checkpoint: 1700000000000-0
      last_event: <event id at the checkpoint>
      versions: {<key>: <aggregate version>, ...}
      listing: {<key>: [size, added, modified], ...}   (projection.Listing)
    <key>: {name: ..., model_type: ..., ...}

Several processes may share the file: each rewrite happens under an ``flock`` on a sidecar lock file,
after reloading the file if another process rewrote it, and events the file already holds are skipped.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from modelbus.events.store import BodyBatch, position_key
from modelbus.services.records.errors import RecordStoreFormatError
from modelbus.services.records.memory_projection import DictProjection, RecordTable
from modelbus.services.records.projection import (
    KIND,
    LISTING,
    RECORDS_VERSION,
    Listing,
    fresh_entries,
    listing_of,
)

SCHEMA = 2  # 2: the listing values in the header
METADATA = "__metadata__"

_Dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_records_yaml(path: Path) -> dict[str, Any] | None:
    """The parsed file, ``None`` when it is empty; RecordStoreFormatError when it is not ours."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecordStoreFormatError(f"{path}: not a text file, so not a YAML record store ({exc})") from None
    if not text.strip():
        return None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise RecordStoreFormatError(f"{path}: malformed YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RecordStoreFormatError(f"{path}: expected a mapping of model records, got {type(data).__name__}")
    meta = data.get(METADATA)
    if not isinstance(meta, dict) or "version" not in meta:
        raise RecordStoreFormatError(f"{path}: no {METADATA} header with a version: not a model record file")
    if str(meta.get("version")) != RECORDS_VERSION or meta.get("kind") != KIND:
        raise RecordStoreFormatError(
            f"{path}: record file version {meta.get('version')!r} (kind {meta.get('kind')!r}) is not ours "
            f"({RECORDS_VERSION}, {KIND}); a legacy InvokeAI models.yaml is brought in with "
            f"`modelbus import-yaml {path}`")
    return data


class YamlProjection(DictProjection):
    def __init__(self, path: Path, models_dir: Path | None = None, lock: Any = None) -> None:
        super().__init__(models_dir, lock)
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._seen: tuple[int, int, int] | None = None
        self._sync_from_disk()

    # --- the file -------------------------------------------------------------------------------

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _sync_from_disk(self) -> None:
        """Reload when another process (or a person) changed the file since we last saw it."""
        stat = self._stat()
        if stat == self._seen:
            return
        table = RecordTable()
        data = read_records_yaml(self.path) if stat is not None else None
        if data is not None:
            meta = data.pop(METADATA)
            if int(meta.get("schema", 0)) != SCHEMA:
                self.stale = True
            else:
                states = {}
                listing = meta.get("listing") or {}
                for key, body in data.items():
                    if not isinstance(body, dict):
                        raise RecordStoreFormatError(f"{self.path}: record {key!r} is not a mapping")
                    values = listing.get(key)
                    states[str(key)] = {**body, "key": str(key), LISTING: Listing(*values) if values else Listing()}
                versions = {str(k): int(v) for k, v in (meta.get("versions") or {}).items()}
                table.load(states, versions, str(meta.get("checkpoint") or "0-0"), meta.get("last_event"))
        self.table = table
        self._cache.clear()
        self._seen = stat

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write(self) -> None:
        meta = {"version": RECORDS_VERSION, "kind": KIND, "schema": SCHEMA,
                "checkpoint": self.table.checkpoint, "last_event": self.table.last_event_id,
                "versions": self.table.versions,
                "listing": {k: list(listing_of(s)) for k, s in sorted(self.table.states.items())}}
        body: dict[str, Any] = {METADATA: meta}
        for key, state in sorted(self.table.states.items()):
            body[key] = {k: v for k, v in state.items() if k != "key" and k != LISTING}
        text = yaml.dump(body, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)  # atomic: readers see the old file or the new one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._seen = self._stat()

    # --- the projection -------------------------------------------------------------------------

    def checkpoint(self) -> str:
        with self.lock:
            self._sync_from_disk()
            return self.table.checkpoint

    def _commit(self, batch: BodyBatch) -> None:
        with self._file_lock():
            known = self.table.checkpoint
            self._sync_from_disk()
            if position_key(self.table.checkpoint) < position_key(known):
                # the file went back (deleted, or replaced by an older one) since this batch was read:
                # applying it now would skip the events in between; the runner replays from our checkpoint
                return
            fresh = fresh_entries(batch, self.table.checkpoint)
            if fresh is None:
                return
            previous = (dict(self.table.states), dict(self.table.versions), self.table.checkpoint,
                        self.table.last_event_id)
            try:
                self.table.change(self.fold_batch(fresh), batch.position, batch.event_id)
                self._write()
            except BaseException:
                self.table.load(*previous)  # the file was not replaced: neither is our view of it
                self._cache.clear()
                raise

    def reset(self) -> None:
        with self.lock, self._file_lock():
            self.table = RecordTable()
            self._cache.clear()
            self.stale = False
            self._write()

    def ensure_file(self) -> None:
        """Write an empty store when there is no file yet (the spec: created and initialised)."""
        with self.lock, self._file_lock():
            if self._stat() is None:
                self._write()
