"""Redis going away under load: writer processes add models through the record service while a
subscriber follows the log, and the test drops every connection, pauses the server, restarts it
cleanly, or SIGKILLs it and starts it again from its AOF (``appendfsync always``: durability
``fsync``). Everyone must reconnect and carry on; no acknowledged event may be lost or doubled."""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from modelbus.events.schema import ModelAdded
from modelbus.events.store import RedisEventStore, StoredEvent
from modelbus.services.config import AppConfig
from modelbus.services.records import ModelRecordServiceSQL
from tests.faults.redis_proc import PrivateRedis

REPO_ROOT = Path(__file__).resolve().parents[2]
WRITERS = 2
PER_WRITER = 150
T = TypeVar("T")
PAUSE = 0.01  # between one writer's adds: the run lasts a few seconds, long enough to hit the fault


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[PrivateRedis]:
    srv = PrivateRedis(tmp_path / "redis").start()
    yield srv
    srv.stop()


def _drop_connections(srv: PrivateRedis) -> str:
    for _ in range(3):
        srv.client().client_kill_filter(_type="normal", skipme=True)
        time.sleep(0.4)
    return "CLIENT KILL TYPE normal, 3 times 0.4 s apart"


def _pause(srv: PrivateRedis) -> str:
    srv.client().execute_command("CLIENT", "PAUSE", 3000, "ALL")
    time.sleep(3.2)
    return "CLIENT PAUSE 3000 ALL (server answers nobody for 3 s)"


def _restart(srv: PrivateRedis) -> str:
    srv.restart_after(signal.SIGTERM, down_for=2.5)
    return "redis-server stopped (SIGTERM), down 2.5 s, started again on the same port"


def _sigkill(srv: PrivateRedis) -> str:
    srv.restart_after(signal.SIGKILL, down_for=2.5)
    return "redis-server SIGKILLed, down 2.5 s, restarted from its AOF on the same port"


FAULTS: dict[str, Callable[[PrivateRedis], str]] = {
    "drop-connections": _drop_connections, "pause": _pause, "restart": _restart, "sigkill": _sigkill,
}


class Writer:
    def __init__(self, url: str, namespace: str, root: Path, prefix: str) -> None:
        self.acked: list[str] = []
        self.errors: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.writer", url, namespace, str(root), prefix, str(PER_WRITER),
             str(PAUSE)], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if line == "READY":
                self.ready.set()
            elif line.startswith("ERR "):
                self.errors.append(line)
            elif line.startswith("ACK "):
                self.acked.append(line[4:])

    def join(self, timeout: float) -> None:
        self.proc.wait(timeout=timeout)
        self.thread.join(timeout=5)


def run_through_fault(writers: list[Writer], fault: Callable[[], T]) -> tuple[int, T, int]:
    """Once every writer has 20 acknowledged adds, run ``fault``, then let the writers finish (killing any
    left). Returns the acknowledged adds before the fault, what ``fault`` returned, and those after it."""
    try:
        for w in writers:
            assert w.ready.wait(60), "writer did not start"
        deadline = time.monotonic() + 30
        while min(len(w.acked) for w in writers) < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        before = sum(len(w.acked) for w in writers)
        result = fault()
        after = sum(len(w.acked) for w in writers)
        for w in writers:
            w.join(timeout=90)
    finally:
        for w in writers:
            if w.proc.poll() is None:
                w.proc.kill()
    return before, result, after


class Subscriber:
    """Follows the log from the start in a thread, as a client would, through the fault."""

    def __init__(self, store: RedisEventStore) -> None:
        self.seen: list[StoredEvent] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, args=(store,), daemon=True)
        self._thread.start()

    def _follow(self, store: RedisEventStore) -> None:
        for stored in store.subscribe(since="0-0", block_ms=200, stop=self._stop.is_set):
            self.seen.append(stored)

    def stop_after(self, count: int, timeout: float = 20) -> None:
        """Wait until it has seen ``count`` events (or ``timeout``), then stop it."""
        deadline = time.monotonic() + timeout
        while len(self.seen) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        self._thread.join(timeout=10)


@dataclass
class Tally:
    """What the writers were told and what the log holds after a fault."""

    acked: list[str]
    errors: list[str]
    log: list[StoredEvent]
    per_key: collections.Counter[str]

    @property
    def lost(self) -> list[str]:
        return sorted(set(self.acked) - set(self.per_key))

    @property
    def doubled(self) -> list[str]:
        return sorted(k for k, n in self.per_key.items() if n > 1)


def tally(writers: list[Writer], store: RedisEventStore, subscriber: Subscriber) -> Tally:
    log = list(store.read_all())
    result = Tally([k for w in writers for k in w.acked], [e for w in writers for e in w.errors], log,
                   collections.Counter(s.event.aggregate_id for s in log if isinstance(s.event, ModelAdded)))
    subscriber.stop_after(len(log))
    return result


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_writers_and_subscriber_survive_a_redis_outage(server: PrivateRedis, tmp_path: Path, fault: str) -> None:
    namespace = f"outage-{uuid.uuid4().hex[:8]}"
    store = RedisEventStore.from_url(server.url, namespace)
    subscriber = Subscriber(store)
    writers = [Writer(server.url, namespace, tmp_path, f"w{i}") for i in range(WRITERS)]
    before, what, after = run_through_fault(writers, lambda: FAULTS[fault](server))
    t = tally(writers, RedisEventStore.from_url(server.url, namespace), subscriber)
    acked, errors, log, per_key, lost, doubled, seen = t.acked, t.errors, t.log, t.per_key, t.lost, t.doubled, \
        subscriber.seen
    seen_positions = [s.position for s in seen]
    config = AppConfig.load(root=tmp_path, namespace=namespace, redis_url=server.url)
    rebuilt = ModelRecordServiceSQL.from_db_file(tmp_path / "check.db", store, config=config)
    try:
        projected = {m.key for m in rebuilt.all_models()}
    finally:
        rebuilt.close()
    print(f"\n[{fault}] {what}: {WRITERS} writers, {WRITERS * PER_WRITER} adds tried, {before} acknowledged "
          f"before the fault, {after - before} during it, {len(acked)} in all, {len(errors)} errors; "
          f"log holds {len(per_key)} models; lost {len(lost)}, doubled {len(doubled)}; subscriber saw "
          f"{len(seen)} of {len(log)} events ({len(seen_positions) - len(set(seen_positions))} repeated); "
          f"rebuilt projection holds {len(projected)}")
    assert errors == [], errors[:5]
    assert len(acked) == WRITERS * PER_WRITER
    assert lost == [] and doubled == []
    assert seen_positions == [s.position for s in log], "the subscriber missed or repeated events"
    assert projected == set(per_key) == set(acked)
