"""Projections: read models built by applying the log in order.

A projection stores its checkpoint (the last position it applied) in the same transaction as the rows
it wrote, so a replay after a crash never applies an event twice. The runner catches a projection up
from its checkpoint, and can wait until it has applied a given position (read-your-writes).
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Protocol

from modelbus.events import defaults
from modelbus.events.errors import EventStoreError
from modelbus.events.store import BodyBatch, EventStore, StoredEvent, position_key


class Projection(Protocol):
    """What the runner needs. A projection may also offer ``bulk_load()``: a context manager the runner
    holds around a full rebuild (one transaction, no per-batch durability: the log is the truth).

    A projection that declares ``event_types`` (a set of type names) is fed through ``apply_bodies``
    instead of ``apply``, one :class:`BodyBatch` at a time: the entries of those types as envelopes and
    bodies (see codec.EventBody), several times cheaper to read than events built and validated one by one."""

    def checkpoint(self) -> str:
        """The last position applied, ``"0-0"`` when none."""

    def apply(self, batch: Sequence[StoredEvent]) -> None:
        """Apply the batch and save ``batch[-1].position`` as the checkpoint, atomically."""

    def reset(self) -> None:
        """Forget every row and the checkpoint (before a rebuild)."""


Batch = Sequence[StoredEvent] | BodyBatch


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector during a full replay: it allocates millions of short-lived,
    acyclic objects (freed by reference counting), and the collector's passes over them find nothing
    to free yet cost a fifth of the replay. Collection resumes, and catches up, when the replay ends."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class ProjectionRunner:
    """Feeds a projection from a store. Thread-safe: one catch-up at a time."""

    def __init__(self, store: EventStore, projection: Projection, batch_size: int = defaults.READ_BATCH) -> None:
        self.store = store
        self.projection = projection
        self.batch_size = batch_size
        self._lock = threading.RLock()

    def catch_up(self) -> str:
        """Apply everything after the checkpoint; returns the new checkpoint."""
        with self._lock:
            return self._apply_from(self.projection.checkpoint(), self.batch_size)

    def _fetch(self, position: str, count: int) -> tuple[Batch, str]:
        """The next batch after ``position`` and where it ends (``position`` itself at the end of the log)."""
        types = getattr(self.projection, "event_types", None)
        if types is not None:
            bodies = self.store.read_bodies(position, count, types)
            return bodies, bodies.position
        events = self.store.read(position, count=count)
        return events, (events[-1].position if events else position)

    def _apply(self, batch: Batch) -> None:
        if isinstance(batch, BodyBatch):
            self.projection.apply_bodies(batch)  # type: ignore[attr-defined]
        else:
            self.projection.apply(batch)

    def _apply_from(self, position: str, batch_size: int) -> str:
        while True:
            batch, end = self._fetch(position, batch_size)
            if end == position:
                return position
            self._apply(batch)
            position = end
            reached = self.projection.checkpoint()
            if position_key(reached) < position_key(position):
                position = reached  # the projection went back (its file was deleted): replay from there

    def _replay(self, position: str, batch_size: int) -> str:
        """``_apply_from`` with the next batch read (from Redis, and decoded) in a second thread while this
        one applies the current batch: the projection's database work and the read's network wait and
        parsing overlap."""
        with ThreadPoolExecutor(1, thread_name_prefix="replay-read") as reader:
            pending = reader.submit(self._fetch, position, batch_size)
            while True:
                batch, end = pending.result()
                if end == position:
                    return position
                position = end
                pending = reader.submit(self._fetch, position, batch_size)
                self._apply(batch)

    def rebuild(self) -> str:
        """Forget the projection's rows and replay the whole log into it."""
        with self._lock:
            bulk_load = getattr(self.projection, "bulk_load", None)
            with _collector_paused(), (bulk_load() if bulk_load is not None else nullcontext()):
                self.projection.reset()
                return self._replay(self.projection.checkpoint(), max(self.batch_size, defaults.REBUILD_BATCH))

    def wait_for(self, position: str, timeout: float = 10.0) -> str:
        """Catch up until ``position`` is applied (read-your-writes for a position another process got)."""
        deadline = time.monotonic() + timeout
        target = position_key(position)
        while True:
            reached = self.catch_up()
            if position_key(reached) >= target:
                return reached
            if time.monotonic() > deadline:
                raise EventStoreError(f"projection did not reach {position} within {timeout}s (at {reached})")
            time.sleep(0.01)
