"""Appends on a plain Redis go on connections the store keeps (events.store._evalsha): they survive the
server dropping them, a forked child makes its own, concurrent appends each get one, and an error reply
leaves the connection usable. (Under Sentinel the pool's connections are used: tests/faults/test_failover.py
fails over under writers.)"""

from __future__ import annotations

import os
import threading

import redis

from modelbus.events.errors import ConcurrencyError
from modelbus.events.schema import ModelRenamed
from modelbus.events.store import RedisEventStore


def _rename(key: str, n: int) -> ModelRenamed:
    return ModelRenamed(aggregate_id=key, old_name=f"n{n}", new_name=f"n{n + 1}")


def _client_id(conn: redis.Connection) -> int:
    conn.send_command("CLIENT", "ID")
    return int(conn.read_response())


def test_appends_reuse_one_connection_and_survive_its_loss(event_store: RedisEventStore) -> None:
    store = event_store
    store.append([_rename("a", 0)], expected_version=0)
    kept = store._kept[0]
    first = _client_id(kept)
    for n in range(1, 5):
        store.append([_rename("a", n)], expected_version=n)
    assert store._kept == [kept] and _client_id(kept) == first  # five appends, one connection
    store.client.client_kill_filter(_id=first)  # the server drops it
    store.append([_rename("a", 5)], expected_version=5)  # retried on a fresh connection
    assert store.version("a") == 6 and len(store.history("a")) == 6
    assert len(store._kept) == 1 and _client_id(store._kept[0]) != first


def test_an_error_reply_keeps_the_connection(event_store: RedisEventStore) -> None:
    store = event_store
    store.append([_rename("b", 0)], expected_version=0)
    kept = list(store._kept)
    try:
        store.append([_rename("b", 5)], expected_version=5)
    except ConcurrencyError:
        pass
    else:
        raise AssertionError("a wrong expected version was accepted")
    assert store._kept == kept
    store.append([_rename("b", 1)], expected_version=1)
    assert store.version("b") == 2


def test_concurrent_appends_each_have_a_connection(event_store: RedisEventStore) -> None:
    store = event_store
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            barrier.wait()
            for n in range(20):
                store.append([_rename(f"t{i}", n)], expected_version=n)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [store.version(f"t{i}") for i in range(4)] == [20] * 4
    assert 1 <= len(store._kept) <= 4


def test_a_forked_child_appends_on_its_own_connection(event_store: RedisEventStore) -> None:
    store = event_store
    store.append([_rename("f", 0)], expected_version=0)
    parent_conn = store._kept[0]
    pid = os.fork()
    if pid == 0:  # the child: its append must not use (and so corrupt) the parent's socket
        code = 1
        try:
            store.append([_rename("f", 1)], expected_version=1)
            code = 0 if store._kept and store._kept[0] is not parent_conn else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    store.append([_rename("f", 2)], expected_version=2)  # the parent's connection still in step
    assert store._kept[0] is parent_conn and store.version("f") == 3

