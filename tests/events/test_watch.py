"""Log watches: a reader learns of every append without a round trip, and distrusts silence it cannot
vouch for (connection killed, heartbeats missing, tracking refused)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis
import structlog

from modelbus.events.schema import ModelAdded
from modelbus.events.store import EventStore, RedisEventStore
from modelbus.events.watch import WATCH_CLIENT_NAME, LogWatch, RedisLogWatch
from tests.fixtures.activity import load_payload
from tests.record_configs import record_config


@pytest.fixture()
def watch(store: EventStore) -> Iterator[LogWatch]:
    found = store.watch()
    assert found is not None
    yield found
    found.close()


def _append(store: EventStore, n: int = 0) -> None:
    key = f"k{n}-{uuid.uuid4().hex[:6]}"
    store.append([ModelAdded(aggregate_id=key, config=record_config(key))])


def _other_writer(store: EventStore) -> EventStore:
    """A writer on its own connection (another process, as far as Redis can tell)."""
    if isinstance(store, RedisEventStore):
        return RedisEventStore.from_url(store.url or "", store.namespace)
    return store


def test_every_append_breaks_the_silence_before_it_is_acknowledged(store: EventStore, watch: LogWatch) -> None:
    writer = _other_writer(store)
    for n in range(200):
        watch.arm()
        assert watch.quiet()
        _append(writer, n)
        # no wait: the push is in our socket before the writer held its reply
        assert not watch.quiet(), f"append {n} went unnoticed"
    print("\n200 appends by another connection: each seen by the watch as soon as it was acknowledged")


def test_other_streams_and_namespaces_leave_the_watch_quiet(store: EventStore, watch: LogWatch,
                                                            redis_url: str) -> None:
    watch.arm()
    store.publish_activity("model_load_started", load_payload("x"))  # the capped activity stream
    _append(RedisEventStore.from_url(redis_url, f"other-{uuid.uuid4().hex[:6]}"))
    assert watch.quiet()


def _kill_watch_connections(client: redis.Redis) -> int:
    killed = 0
    for info in client.client_list():
        if info.get("name") == WATCH_CLIENT_NAME:
            killed += int(client.client_kill_filter(_id=info["id"]))
    return killed


def test_a_killed_connection_is_noticed_and_replaced(event_store: RedisEventStore) -> None:
    watch = RedisLogWatch(event_store.client, event_store.keys.events, retry_every=0.05)
    try:
        watch.arm()
        assert watch.quiet()
        assert _kill_watch_connections(event_store.client) >= 1
        _append(event_store)  # made while no watch was listening
        with structlog.testing.capture_logs() as logs:
            assert not watch.quiet()
        assert any(entry["event"] == "log_watch_lost" for entry in logs)
        deadline = time.monotonic() + 10
        while True:  # connected again after retry_every: silence is trusted only after the next arm
            watch.arm()
            if watch.quiet():
                break
            assert time.monotonic() < deadline, "the watch did not come back"
            time.sleep(0.05)
        _append(event_store)
        assert not watch.quiet()
    finally:
        watch.close()


def test_silence_without_answered_heartbeats_is_not_trusted(event_store: RedisEventStore) -> None:
    # heartbeats far apart: after max_quiet the watch cannot vouch that its connection still delivers
    watch = RedisLogWatch(event_store.client, event_store.keys.events, max_quiet=0.2, heartbeat=3600)
    try:
        watch.arm()
        assert watch.quiet()
        time.sleep(0.3)
        assert not watch.quiet()
    finally:
        watch.close()
    # with heartbeats answered, the same silence stays trusted
    watch = RedisLogWatch(event_store.client, event_store.keys.events, max_quiet=0.5, heartbeat=0.05)
    try:
        watch.arm()
        time.sleep(0.8)
        assert watch.quiet()
    finally:
        watch.close()


def test_tracking_refused_means_round_trips(redis_url: str, namespace: str) -> None:
    admin = redis.Redis.from_url(redis_url)
    user, password = f"nowatch-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    admin.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"], channels=["*"],
                      commands=["+@all", "-client"])
    try:
        url = redis_url.replace("redis://", f"redis://{user}:{password}@", 1)
        store = RedisEventStore.from_url(url, namespace)
        watch = store.watch()
        assert watch is not None
        with structlog.testing.capture_logs() as logs:
            watch.arm()
            assert not watch.quiet()
        assert any(entry["event"] == "log_watch_unavailable" for entry in logs)
        _append(store)  # the store itself works: only the watch is refused
        watch.close()
    finally:
        admin.acl_deluser(user)


def test_a_forked_child_watches_on_its_own_connection(event_store: RedisEventStore) -> None:
    """An RQ work horse is a fork: reading the parent's socket would take the pushes the parent waits for."""
    import os

    watch = RedisLogWatch(event_store.client, event_store.keys.events)
    try:
        watch.arm()
        assert watch.quiet()
        pid = os.fork()
        if pid == 0:  # the child: its own connection, its own signals
            code = 3
            try:
                watch.arm()
                quiet_before = watch.quiet()
                _append(event_store)
                code = 0 if quiet_before and not watch.quiet() else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child's watch did not work on its own"
        assert not watch.quiet(), "the parent missed the child's append"
    finally:
        watch.close()
