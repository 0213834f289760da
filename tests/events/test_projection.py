"""A projection that keeps its checkpoint in the same SQLite transaction as its rows."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from modelbus.events.projection import ProjectionRunner
from modelbus.events.schema import ModelAdded, ModelRemoved
from modelbus.events.store import EventStore, StoredEvent
from tests.record_configs import record_config


class CountingProjection:
    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path)
        self.db.execute("CREATE TABLE IF NOT EXISTS models (key TEXT PRIMARY KEY)")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (checkpoint TEXT)")
        self.applied = 0

    def checkpoint(self) -> str:
        row = self.db.execute("SELECT checkpoint FROM meta").fetchone()
        return row[0] if row else "0-0"

    def apply(self, batch: Sequence[StoredEvent]) -> None:
        with self.db:
            for stored in batch:
                self.applied += 1
                if isinstance(stored.event, ModelAdded):
                    self.db.execute("INSERT INTO models VALUES (?)", (stored.event.aggregate_id,))
                elif isinstance(stored.event, ModelRemoved):
                    self.db.execute("DELETE FROM models WHERE key = ?", (stored.event.aggregate_id,))
            self.db.execute("DELETE FROM meta")
            self.db.execute("INSERT INTO meta VALUES (?)", (batch[-1].position,))

    def reset(self) -> None:
        with self.db:
            self.db.execute("DELETE FROM models")
            self.db.execute("DELETE FROM meta")

    def stored_keys(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT key FROM models ORDER BY key")]


def test_catch_up_resumes_from_the_checkpoint_and_never_applies_twice(store: EventStore, tmp_path: Path) -> None:
    for n in range(25):
        store.append([ModelAdded(aggregate_id=f"m{n:02d}", config=record_config(f"m{n:02d}"))])
    store.append([ModelRemoved(aggregate_id="m03")])
    first = CountingProjection(tmp_path / "p.db")
    ProjectionRunner(store, first, batch_size=7).catch_up()
    assert first.applied == 26 and "m03" not in first.stored_keys() and len(first.stored_keys()) == 24
    store.append([ModelAdded(aggregate_id="late", config=record_config("late"))])
    reopened = CountingProjection(tmp_path / "p.db")  # a restart: same file, fresh process state
    position = ProjectionRunner(store, reopened).catch_up()
    assert reopened.applied == 1 and "late" in reopened.stored_keys() and position == store.head()


def test_rebuild_gives_the_same_answers(store: EventStore, tmp_path: Path) -> None:
    for n in range(10):
        store.append([ModelAdded(aggregate_id=f"m{n}", config=record_config(f"m{n}"))])
    projection = CountingProjection(tmp_path / "p.db")
    runner = ProjectionRunner(store, projection)
    runner.catch_up()
    before = projection.stored_keys()
    runner.rebuild()
    assert projection.stored_keys() == before


def test_wait_for_a_position_appended_elsewhere(store: EventStore, tmp_path: Path) -> None:
    runner = ProjectionRunner(store, CountingProjection(tmp_path / "p.db"))
    position = store.append([ModelAdded(aggregate_id="x", config=record_config("x"))]).positions[0]
    assert runner.wait_for(position, timeout=5) == position
