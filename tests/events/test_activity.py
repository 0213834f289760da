"""Activity events are typed: each known kind decodes into its own class with a typed payload, on the wire
as ``{"kind", "payload"}`` as before; an unknown kind still arrives (as a plain Activity), and a payload
that does not fit its kind is refused at publish and skipped on read."""

from __future__ import annotations

import orjson
import pytest

from modelbus.events.codec import encode
from modelbus.events.errors import InvalidEventError
from modelbus.events.schema import (
    ACTIVITY_ADAPTER,
    ACTIVITY_KINDS,
    Activity,
    CacheEvicted,
    ModelFetchProgress,
    ModelLoadCompleted,
    activity,
)
from modelbus.events.store import RedisEventStore
from tests.fixtures.activity import load_payload


def test_known_kinds_decode_typed_through_the_store(event_store: RedisEventStore) -> None:
    event_store.publish_activity("model_load_completed", load_payload("k1", cache_hit=True, bytes=5), source="w1")
    event_store.publish_activity("cache_evicted", {"key": "k1:unet", "model_key": "k1", "submodel": "unet",
                                                   "bytes": 5, "from": "vram", "to": "ram", "reason": "room"})
    event_store.publish_activity("some_future_kind", {"anything": [1, 2]})
    loaded, evicted, future = (s.event for s in event_store.read(stream="activity"))
    assert isinstance(loaded, ModelLoadCompleted) and loaded.payload.cache_hit is True and loaded.payload.bytes == 5
    assert isinstance(evicted, CacheEvicted) and evicted.payload.from_ == "vram" and evicted.payload["from"] == "vram"
    assert type(future) is Activity and future.kind == "some_future_kind" and future.payload == {"anything": [1, 2]}


def test_a_model_fetch_decodes_typed(event_store: RedisEventStore) -> None:
    event_store.publish_activity("model_fetch_progress", {"model_key": "k", "bytes": 5, "total_bytes": 9, "worker": "w"})
    (stored,) = event_store.read(stream="activity")
    assert isinstance(stored.event, ModelFetchProgress) and stored.event.payload.total_bytes == 9


def test_the_wire_keeps_the_spec_fields() -> None:
    event = activity("model_load_started", load_payload("k", queue_id="q", queue_item_id=7))
    body = orjson.loads(encode(event)["body"])
    assert body["kind"] == "model_load_started"
    assert set(body["payload"]) >= {"queue_id", "queue_item_id", "queue_batch_id", "graph_execution_state_id",
                                    "model_key", "submodel", "hash", "location", "precision"}
    assert body["payload"]["queue_item_id"] == 7 and body["payload"]["queue_id"] == "q"
    evicted = activity("cache_evicted", {"key": "a", "bytes": 1, "from": "ram", "to": "out", "reason": "clear"})
    assert "from" in orjson.loads(encode(evicted)["body"])["payload"]


def test_one_union_picks_the_class_by_kind() -> None:
    for kind, cls in ACTIVITY_KINDS.items():
        assert cls.model_fields["kind"].default == kind
    assert len(set(ACTIVITY_KINDS.values())) == len(ACTIVITY_KINDS)  # one class per kind
    dumped = activity("model_load_completed", load_payload()).model_dump()
    assert type(ACTIVITY_ADAPTER.validate_python(dumped)) is ModelLoadCompleted
    assert type(ACTIVITY_ADAPTER.validate_python({**dumped, "kind": "other", "payload": {}})) is Activity


def test_a_payload_that_does_not_fit_is_refused_and_nothing_is_published(event_store: RedisEventStore) -> None:
    with pytest.raises(InvalidEventError, match="model_load_started .*the payload does not fit its schema: payload.location"):
        event_store.publish_activity("model_load_started", {"model_key": "k", "precision": "x", "device": "cpu",
                                                            "cache_hit": False, "seconds": 0, "bytes": 0})
    assert event_store.read(stream="activity") == []


def test_an_entry_of_a_known_kind_that_does_not_fit_is_skipped(event_store: RedisEventStore) -> None:
    fields = encode(Activity(aggregate_id="w", kind="generic", payload={"model_key": "k"}))
    fields["body"] = orjson.dumps({"kind": "model_load_completed", "payload": {"model_key": "k"}})
    event_store.client.xadd(event_store.keys.activity, fields)  # type: ignore[arg-type]
    event_store.publish_activity("model_load_completed", load_payload("good"))
    assert [s.event.payload.model_key for s in event_store.read(stream="activity")] == ["good"]  # type: ignore[attr-defined]
