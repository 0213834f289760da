"""Projections: read models built by applying the log in order.

A projection stores its checkpoint (the last position it applied) in the same transaction as the rows
it wrote, so a replay after a crash never applies an event twice. The runner catches a projection up
from its checkpoint, and can wait until it has applied a given position (read-your-writes).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Protocol

from events import defaults
from events.errors import EventStoreError
from events.store import EventStore, StoredEvent, position_key


class Projection(Protocol):
    def checkpoint(self) -> str:
        """The last position applied, ``"0-0"`` when none."""

    def apply(self, batch: Sequence[StoredEvent]) -> None:
        """Apply the batch and save ``batch[-1].position`` as the checkpoint, atomically."""

    def reset(self) -> None:
        """Forget every row and the checkpoint (before a rebuild)."""


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
            position = self.projection.checkpoint()
            while True:
                batch = self.store.read(position, count=self.batch_size)
                if not batch:
                    return position
                self.projection.apply(batch)
                position = batch[-1].position

    def rebuild(self) -> str:
        with self._lock:
            self.projection.reset()
            return self.catch_up()

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
