"""RedisEventStore.history fetches and decodes only what was appended since its last read of an
aggregate; what it trusts of an earlier read must never outlive the log it came
from (another writer, a poison entry, an emptied namespace, a flushed script cache)."""

from __future__ import annotations

import redis

from modelbus.events import defaults
from modelbus.events.schema import ModelAdded, ModelUpdated
from modelbus.events.store import RedisEventStore
from tests.record_configs import record_config


def _added(key: str) -> ModelAdded:
    return ModelAdded(aggregate_id=key, config=record_config(key))


def _renamed(key: str, name: str) -> ModelUpdated:
    return ModelUpdated(aggregate_id=key, changes={"name": name}, config=record_config(key, name))


def _names(store: RedisEventStore, key: str) -> list[str]:
    return [e.event.config["name"] for e in store.history(key)]  # type: ignore[attr-defined]


def test_history_sees_every_later_append_of_another_writer(redis_url: str, namespace: str) -> None:
    reader = RedisEventStore.from_url(redis_url, namespace)
    writer = RedisEventStore.from_url(redis_url, namespace)
    writer.append([_added("a")])
    assert _names(reader, "a") == ["a"]
    for n in range(1, 6):
        writer.append([_renamed("a", f"n{n}")], expected_version=n)
        assert _names(reader, "a") == ["a"] + [f"n{i}" for i in range(1, n + 1)]
    # the same as a reader that never read it before, event for event
    fresh = RedisEventStore.from_url(redis_url, namespace).history("a")
    assert [(s.position, s.event) for s in reader.history("a")] == [(s.position, s.event) for s in fresh]


def test_history_starts_over_when_the_log_it_read_is_gone(redis_url: str, namespace: str) -> None:
    store = RedisEventStore.from_url(redis_url, namespace)
    store.append([_added("a")])
    store.append([_renamed("a", "old")], expected_version=1)
    assert _names(store, "a") == ["a", "old"]
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"*{{{namespace}}}*"):  # a Redis that lost its data
        client.delete(key)
    assert store.history("a") == []
    other = RedisEventStore.from_url(redis_url, namespace)
    other.append([_added("a")])
    other.append([_renamed("a", "new")], expected_version=1)  # as many entries as before, other ones
    assert _names(store, "a") == ["a", "new"]


def test_history_skips_a_poison_entry_once_and_reads_on(redis_url: str, namespace: str) -> None:
    store = RedisEventStore.from_url(redis_url, namespace)
    store.append([_added("a")])
    assert _names(store, "a") == ["a"]
    client = redis.Redis.from_url(redis_url)
    bad = client.xadd(store.keys.events, {"type": "ModelUpdated", "v": "1", "agg": "a", "ver": "2",
                                           "time": "2026-12-07T00:00:00+00:00", "body": "{not json"})
    client.rpush(store.keys.aggregate_index("a"), bad)
    client.hset(store.keys.versions, "a", 2)
    assert _names(store, "a") == ["a"]
    store.append([_renamed("a", "after")], expected_version=2)
    assert _names(store, "a") == ["a", "after"]
    assert [r.position for r in store.quarantined()] == [bad.decode()]


def test_history_survives_a_flushed_script_cache(redis_url: str, namespace: str) -> None:
    store = RedisEventStore.from_url(redis_url, namespace)
    store.append([_added("a")])
    assert _names(store, "a") == ["a"]
    redis.Redis.from_url(redis_url).script_flush()
    store.append([_renamed("a", "b")], expected_version=1)
    assert _names(store, "a") == ["a", "b"]


def test_history_keeps_a_bounded_number_of_aggregates(redis_url: str, namespace: str, monkeypatch) -> None:
    monkeypatch.setattr(defaults, "HISTORY_CACHE", 8)
    store = RedisEventStore.from_url(redis_url, namespace)
    for n in range(20):
        store.append([_added(f"m{n}")])
        assert _names(store, f"m{n}") == [f"m{n}"]
    assert len(store._histories) == 8
    assert _names(store, "m0") == ["m0"]  # read again whole after it was dropped


def test_own_appends_and_entries_seen_arriving_read_back_as_the_log_holds_them(redis_url: str,
                                                                               namespace: str) -> None:
    """A store decodes what it appended, or saw arrive through ``poll``, from the entry it kept instead of
    fetching it: the events must be exactly those a reader that fetches them decodes."""
    writer = RedisEventStore.from_url(redis_url, namespace)
    waiter = RedisEventStore.from_url(redis_url, namespace)
    writer.append([ModelAdded(aggregate_id="ü/a", config=record_config("ü/a"), correlation_id="cmd-1")],
                  expected_version=0, claims={"path:ü": "ü/a"})
    writer.append([_renamed("ü/a", "b ✓"), _renamed("ü/a", "c")], expected_version=1, idempotency_key="k")
    seen, _ = waiter.poll("0-0", "events", 10)
    assert len(seen) == 3
    fresh = RedisEventStore.from_url(redis_url, namespace).history("ü/a")
    assert [s.event.aggregate_version for s in fresh] == [1, 2, 3]
    for store in (writer, waiter):
        assert [(s.position, s.event) for s in store.history("ü/a")] == [(s.position, s.event) for s in fresh]
