"""The Redis primary killed while writers work with durability ``replicated``: Sentinel promotes a
replica, the writer processes (record service, URL ``redis+sentinel://``) follow it and carry on, a
subscriber keeps reading, and no acknowledged event is lost or doubled."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelbus.events.sentinel import connect_sentinel
from modelbus.events.store import RedisEventStore
from tests.deploy.redis_ha import Node, RedisHA, redis_server_binary
from tests.faults.test_redis_outages import PER_WRITER, WRITERS, Subscriber, Writer, run_through_fault, tally

pytestmark = pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not on PATH")


@pytest.fixture()
def ha(tmp_path: Path) -> Iterator[RedisHA]:
    # two replicas: after the failover one is left to answer WAIT 1
    cluster = RedisHA(tmp_path / "ha", replicas=2)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.mark.timeout(150)
def test_primary_killed_replica_promoted_nothing_acknowledged_lost(ha: RedisHA, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELBUS_DURABILITY", "replicated")
    monkeypatch.setenv("MODELBUS_REPLICAS", "1")
    namespace = f"failover-{uuid.uuid4().hex[:8]}"
    client = connect_sentinel(ha.url, socket_timeout=2, socket_connect_timeout=1)
    store = RedisEventStore(client, namespace, retry_deadline=45)
    subscriber = Subscriber(store)

    writers = [Writer(ha.url, namespace, tmp_path, f"f{i}") for i in range(WRITERS)]

    def fail_over() -> tuple[Node, Node, float]:
        old = ha.kill_primary()
        killed_at = time.monotonic()
        new = ha.wait_for_promotion(timeout=30)
        return old, new, time.monotonic() - killed_at

    acked_at_kill, (old, new, promoted_after), _ = run_through_fault(writers, fail_over)
    t = tally(writers, store, subscriber)
    acked, errors, log, per_key, lost, doubled, seen = t.acked, t.errors, t.log, t.per_key, t.lost, t.doubled, \
        subscriber.seen
    # the appends after the failover waited for a replica (WAIT ran on the new primary)
    waits = int(new.client().info("commandstats").get("cmdstat_wait", {}).get("calls", 0))
    print(f"\n[failover, durability replicated] {acked_at_kill} adds acknowledged before SIGKILL of the primary "
          f"(port {old.port}); replica {new.port} promoted after {promoted_after:.1f} s; {len(acked)} of "
          f"{WRITERS * PER_WRITER} acknowledged in all, {len(errors)} errors; log holds {len(per_key)} models; "
          f"lost {len(lost)}, doubled {len(doubled)}; subscriber saw {len(seen)} of {len(log)}; "
          f"{waits} WAIT calls on the new primary")
    assert errors == [], errors[:5]
    assert lost == [] and doubled == []
    assert len(acked) == WRITERS * PER_WRITER
    assert [s.position for s in seen] == [s.position for s in log]
    assert ha.live_primaries() == [new.port]
    assert waits > 0
