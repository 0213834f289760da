"""One test case, run against both stores: the Redis-streams one and the in-memory one."""

from __future__ import annotations

import threading
import time

import pytest

from modelbus.events.errors import ConcurrencyError, EventStoreError, UniqueConstraintError
from modelbus.events.schema import Activity, DownloadProgress, ModelAdded, ModelRemoved, ModelUpdated
from modelbus.events.store import EventStore, InMemoryEventStore, RedisEventStore
from tests.fixtures.activity import download_payload, load_payload
from tests.record_configs import record_config


def added(key: str, **config: object) -> ModelAdded:
    return ModelAdded(aggregate_id=key, config=record_config(key, **config))


def test_append_assigns_versions_and_reads_in_order(store: EventStore) -> None:
    first = store.append([added("a")], expected_version=0)
    second = store.append([ModelUpdated(aggregate_id="a", changes={"name": "x"}, config=record_config("a", "x"))], expected_version=1)
    store.append([added("b")], expected_version=0)
    assert (first.version, second.version) == (1, 2)
    events = store.read()
    assert [(e.event.aggregate_id, e.event.aggregate_version) for e in events] == [("a", 1), ("a", 2), ("b", 1)]
    assert store.read(after=events[0].position)[0].position == events[1].position
    assert store.head() == events[-1].position
    assert store.version("a") == 2 and store.version("missing") == 0


def test_stale_expected_version_is_refused_and_appends_nothing(store: EventStore) -> None:
    store.append([added("a")], expected_version=0)
    with pytest.raises(ConcurrencyError) as info:
        store.append([added("a")], expected_version=0)
    assert (info.value.expected, info.value.actual) == (0, 1)
    assert len(store.read()) == 1


def test_batch_lands_whole_and_requires_one_aggregate(store: EventStore) -> None:
    result = store.append([added("a"), ModelRemoved(aggregate_id="a")], expected_version=0)
    assert result.version == 2 and len(result.positions) == 2
    with pytest.raises(EventStoreError):
        store.append([added("x"), added("y")])
    with pytest.raises(EventStoreError):
        store.append([])
    assert len(store.read()) == 2


def test_idempotency_key_returns_first_positions(store: EventStore) -> None:
    one = store.append([added("a")], idempotency_key="cmd-1")
    two = store.append([added("a")], idempotency_key="cmd-1")
    assert two.duplicate and two.positions == one.positions and two.version == one.version
    assert len(store.read()) == 1


def test_unique_claims_are_atomic_and_released(store: EventStore) -> None:
    store.append([added("a")], expected_version=0, claims={"path:/m/x": "a"})
    with pytest.raises(UniqueConstraintError) as info:
        store.append([added("b")], expected_version=0, claims={"path:/m/x": "b"})
    assert info.value.owner == "a"
    assert store.version("b") == 0 and len(store.read()) == 1
    store.append([ModelRemoved(aggregate_id="a")], releases=["path:/m/x"])
    assert store.claim_owner("path:/m/x") is None
    store.append([added("b")], expected_version=0, claims={"path:/m/x": "b"})
    assert store.claim_owner("path:/m/x") == "b"


def test_history_of_one_aggregate(store: EventStore) -> None:
    for key in ("a", "b", "a", "c", "a"):
        store.append([added(key)])
    history = store.history("a")
    assert [e.event.aggregate_version for e in history] == [1, 2, 3]
    assert all(e.event.aggregate_id == "a" for e in history)


def test_subscribe_from_now_and_from_a_position(store: EventStore) -> None:
    store.append([added("old")])
    got: list[str] = []
    done = threading.Event()

    def consume() -> None:
        for stored in store.subscribe(since="$", block_ms=100, stop=done.is_set):
            got.append(stored.event.aggregate_id)
            if len(got) == 3:
                done.set()

    thread = threading.Thread(target=consume)
    thread.start()
    time.sleep(0.3)
    for key in ("n1", "n2", "n3"):
        store.append([added(key)])
    thread.join(timeout=10)
    assert got == ["n1", "n2", "n3"]
    replay = [s.event.aggregate_id for s in store.read_all()]
    assert replay == ["old", "n1", "n2", "n3"]


def test_activity_stream_is_separate_and_filterable(store: EventStore) -> None:
    store.append([added("a")])
    store.publish_activity("model_load_started", load_payload("a"))
    store.publish_activity("download_progress", download_payload(bytes=1))
    activity = store.read(stream="activity")
    assert [e.event.kind for e in activity if isinstance(e.event, Activity)] == ["model_load_started", "download_progress"]
    assert len(store.read()) == 1
    seen = next(store.subscribe(since="0-0", stream="activity", types=["download_progress"], block_ms=100))
    assert isinstance(seen.event, DownloadProgress) and seen.event.payload.bytes == 1


def test_event_store_reports_and_skips_unknown_entries(event_store: RedisEventStore,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    event_store.append([added("a")])
    event_store.client.xadd(event_store.keys.events, {"type": "FromTheFuture", "v": "1", "agg": "z",
                                                      "ver": "1", "time": "x", "corr": "", "id": "1", "body": "{}"})
    event_store.client.xadd(event_store.keys.events, {"garbage": "yes"})
    event_store.client.xadd(event_store.keys.events, {"type": "ModelAdded", "v": "99", "agg": "z", "ver": "1",
                                                      "time": "2026-01-01T00:00:00+00:00", "corr": "", "id": "2",
                                                      "body": "{}"})
    event_store.append([added("b")])
    assert [e.event.aggregate_id for e in event_store.read()] == ["a", "b"]
    out = capsys.readouterr()
    text = out.out + out.err
    assert "unknown event type 'FromTheFuture'" in text and "newer than" in text


def test_redis_keys_share_one_hash_tag(event_store: RedisEventStore) -> None:
    event_store.append([added("a")], claims={"p": "a"})
    keys = [k.decode() for k in event_store.client.scan_iter(match=f"*{event_store.namespace}*")]
    assert keys and all(k.startswith("{" + event_store.namespace + "}:") for k in keys)


# --- quarantine (events.validation): the same on both stores ---------------------------------------

def test_appends_are_checked_before_they_run(store: EventStore) -> None:
    from modelbus.events.errors import InvalidEventError

    with pytest.raises(InvalidEventError, match="base_model"):
        store.append([ModelAdded(aggregate_id="a", config={**record_config("a"), "base_model": None})])
    with pytest.raises(InvalidEventError, match="assigns 1"):
        store.append([ModelAdded(aggregate_id="a", config=record_config("a"), aggregate_version=3)],
                     expected_version=0)
    with pytest.raises(InvalidEventError, match="not an integer"):
        store.append([ModelAdded(aggregate_id="a", config=record_config("a"))], expected_version="0")  # type: ignore[arg-type]
    assert store.head() == "0-0" and store.version("a") == 0


def test_a_refusal_is_recorded_once_however_many_readers(store: EventStore) -> None:
    from modelbus.events.validation import Refusal

    refusal = Refusal("5-0", "ModelRemoved", "k", 1, "aggregate version 1 repeats the current version 1")
    readers = [store] * 4 if isinstance(store, InMemoryEventStore) else \
        [RedisEventStore.from_url(store.url or "", store.namespace) for _ in range(4)]  # type: ignore[attr-defined]
    recorded: list[bool] = []
    threads = [threading.Thread(target=lambda r=r: recorded.append(r.quarantine(refusal))) for r in readers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(recorded) == [False, False, False, True]
    assert store.quarantine_count() == 1 and store.quarantined_among(["5-0", "6-0"]) == {"5-0"}
    [entry] = store.quarantined()
    assert (entry.position, entry.type, entry.aggregate_id, entry.aggregate_version) == ("5-0", "ModelRemoved", "k", 1)


def test_version_before_counts_what_the_append_recorded(store: EventStore) -> None:
    first = store.append([added("a")]).positions[0]
    store.append([added("b")])
    second = store.append([ModelRemoved(aggregate_id="a")]).positions[0]
    assert [store.version_before("a", p) for p in ("0-0", first, second)] == [0, 0, 1]  # strictly before
    assert store.version_before("a", "99999999999999-0") == 2 and store.version_before("zzz", second) == 0


def test_a_batch_repeated_under_its_idempotency_key_returns_every_position(store: EventStore) -> None:
    batch = [added("a"), ModelUpdated(aggregate_id="a", changes={"name": "b"}, config=record_config("a"))]
    one = store.append(batch, expected_version=0, idempotency_key="cmd-batch")
    two = store.append(batch, expected_version=0, idempotency_key="cmd-batch")
    assert not one.duplicate and two.duplicate
    assert two.positions == one.positions == [s.position for s in store.read()] and two.version == 2


def test_an_idempotency_key_recorded_as_json_by_an_earlier_version_still_answers(event_store: RedisEventStore) -> None:
    """The append script once recorded a key's result as JSON: a repeat after an upgrade gets it back."""
    first = event_store.append([added("a")], idempotency_key="cmd-old")
    event_store.client.hset(event_store.keys.idempotency, "cmd-old",
                            f'{{"ids":["{first.positions[0]}"],"version":{first.version}}}')
    again = event_store.append([added("a")], idempotency_key="cmd-old")
    assert again.duplicate and again.positions == first.positions and again.version == 1
    assert len(event_store.read()) == 1


def test_news_announced_with_an_append_is_published_once_and_only_when_it_lands(store: EventStore) -> None:
    def news(n: int) -> DownloadProgress:
        return DownloadProgress(aggregate_id="a", correlation_id="cmd", payload=download_payload(id=n))

    store.append([added("a")], expected_version=0, idempotency_key="cmd-a", announce=[news(1)])
    store.append([added("a")], expected_version=0, idempotency_key="cmd-a", announce=[news(2)])  # a repeat
    with pytest.raises(ConcurrencyError):
        store.append([added("a")], expected_version=0, announce=[news(3)])
    store.append([added("b")], announce=[news(4), news(5)])
    published = store.read(stream="activity")
    assert [s.event.payload.id for s in published] == [1, 4, 5]  # type: ignore[attr-defined]
    assert [s.event.correlation_id for s in published] == ["cmd"] * 3
    assert [s.event.aggregate_id for s in published] == ["a"] * 3
