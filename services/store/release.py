"""Removing a deleted model's blobs from the store, safely beside installs of the same content.

Each blob has a Redis hash ``{ns}:blob:<hex>`` (``Keys.blob``): one field per install that claims it
(claim token -> time) and, while a delete decides about it, ``deleting`` (the delete's token). One
script sets each, so the two exclude each other:

- An install claims its model's blobs before it looks for them in the store (``publish``) and drops
  its claims once its ``ModelAdded`` is in the log (or it failed). A claim waits while a delete holds
  the blob's mark.
- A delete, after its ``ModelRemoved`` is in the log, marks each blob of the removed manifest (refused
  while an install claims it: the blob stays), then reads the log to its end and removes from the store
  only the marked blobs that no record's manifest names; then it drops its marks.

So a blob goes only when no install holds a claim on it, and every install that dropped its claim had
recorded the blob before (the delete's read of the log sees it): no record ever names a removed blob.
A claim of a killed install lapses after ``CLAIM_TTL`` (until then the blob is kept; ``store gc``
removes it later); a killed delete's mark after ``DELETE_MARK_TTL``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from modelbus.events.keys import Keys
from modelbus.events.logs import get_logger
from modelbus.events.schema import FileEntry
from modelbus.services.store import defaults, open_store
from modelbus.services.store.blobs import BlobStore
from modelbus.services.store.errors import StoreError

log = get_logger(__name__)

_CLAIM = """
if redis.call('HEXISTS', KEYS[1], 'deleting') == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
"""

# 1: marked; 0: an install claims it; -1: another delete marks it
_MARK = """
if redis.call('HEXISTS', KEYS[1], 'deleting') == 1 then return -1 end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'deleting', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

_UNMARK = """
if redis.call('HGET', KEYS[1], 'deleting') == ARGV[1] then redis.call('HDEL', KEYS[1], 'deleting') end
return 1
"""


@dataclass
class ReleaseReport:
    removed: list[str] = field(default_factory=list)      # blobs deleted from the store
    referenced: list[str] = field(default_factory=list)   # still named by another record
    claimed: list[str] = field(default_factory=list)      # an install in progress claims them
    busy: list[str] = field(default_factory=list)         # another delete kept deciding about them


class BlobClaims:
    """The claims and marks of one namespace's store blobs (see the module's rule)."""

    def __init__(self, client: Any, keys: Keys) -> None:
        self.client, self.keys = client, keys
        self._claim = client.register_script(_CLAIM)
        self._mark = client.register_script(_MARK)
        self._unmark = client.register_script(_UNMARK)

    @contextmanager
    def held(self, digests: Iterable[str]) -> Iterator[None]:
        """Claim ``digests`` for an install from before its upload until after its record (the block)."""
        token, wanted = f"claim-{uuid.uuid4().hex}", sorted(set(digests))
        ttl = str(int(defaults.CLAIM_TTL * 1000))
        try:
            for digest in wanted:
                while not self._claim(keys=[self.keys.blob(digest)], args=[token, str(time.time()), ttl]):
                    time.sleep(defaults.CLAIM_WAIT)  # a delete is deciding: the blob may be gone after it
            yield
        finally:
            pipe = self.client.pipeline(transaction=False)
            for digest in wanted:
                pipe.hdel(self.keys.blob(digest), token)
            pipe.execute()

    def release(self, store: BlobStore, digests: Iterable[str], referenced: Callable[[], set[str]]) -> ReleaseReport:
        """Remove from ``store`` the blobs of ``digests`` no record names (``referenced()``: the digests
        every record's manifest names, read from the log after the marks are set)."""
        report = ReleaseReport()
        pending = sorted(set(digests))
        deadline = time.monotonic() + defaults.DELETE_MARK_TTL
        while pending:
            busy = self._release_once(store, pending, referenced, report)
            if not busy or time.monotonic() > deadline:
                report.busy = busy
                break
            pending = busy  # our marks are dropped: wait for the other delete's without holding any
            time.sleep(defaults.CLAIM_WAIT)
        log.info("model_blobs_released", store=store.url, removed=len(report.removed),
                 referenced=len(report.referenced), claimed=len(report.claimed), busy=len(report.busy))
        return report

    def _release_once(self, store: BlobStore, digests: Sequence[str], referenced: Callable[[], set[str]],
                      report: ReleaseReport) -> list[str]:
        token, ttl = f"delete-{uuid.uuid4().hex}", str(int(defaults.DELETE_MARK_TTL * 1000))
        marked, busy = [], []
        try:
            for digest in digests:
                outcome = int(self._mark(keys=[self.keys.blob(digest)], args=[token, ttl]))
                if outcome == 1:
                    marked.append(digest)
                elif outcome == 0:
                    report.claimed.append(digest)
                else:
                    busy.append(digest)
            if marked:
                named = referenced()
                for digest in marked:
                    if digest in named:
                        report.referenced.append(digest)
                    else:
                        store.delete(digest)
                        report.removed.append(digest)
        finally:
            for digest in marked:
                self._unmark(keys=[self.keys.blob(digest)], args=[token])
        return busy


def claims_for(event_store: Any) -> BlobClaims | None:
    """The blob claims of an event store's namespace; None for a store without Redis (one process)."""
    client = getattr(event_store, "client", None)
    keys = getattr(event_store, "keys", None)
    return BlobClaims(client, keys) if client is not None and keys is not None else None


@contextmanager
def claimed(event_store: Any, store: BlobStore | None, files: Sequence[FileEntry]) -> Iterator[None]:
    """Hold claims on ``files``' blobs for the block when models live in a store (see the module)."""
    claims = claims_for(event_store) if store is not None else None
    if claims is None:
        yield
        return
    with claims.held(f.blake3 for f in files):
        yield


def release_model_blobs(config: Any, records: Any, key: str,
                        manifest: Callable[[str], Sequence[FileEntry]]) -> ReleaseReport | None:
    """After model ``key``'s record was removed: remove from the configured store the blobs of its
    manifest (``manifest(key)``: from its history) that no other record names (None when models live in
    the shared directory). A store that does not answer leaves them (``store gc`` removes them later):
    the delete itself has happened."""
    store, claims = open_store(config), claims_for(getattr(records, "event_store", None))
    files = manifest(key) if store is not None and claims is not None else ()
    if not files:
        return None

    def referenced() -> set[str]:
        records.sync()
        return {e.blake3 for m in records.all_models() for e in manifest(m.key)}

    assert store is not None and claims is not None
    try:
        return claims.release(store, (f.blake3 for f in files), referenced)
    except StoreError as exc:
        log.warning("model_blobs_not_released", key=key, store=store.url, error=str(exc))
        return None
