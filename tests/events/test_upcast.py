"""Old schema versions are upcast on read: a stored v1 entry reads as the current version."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from modelbus.events import schema
from modelbus.events.codec import decode
from modelbus.events.errors import EventDecodeError
from modelbus.events.schema import ModelRenamed
from modelbus.events.store import RedisEventStore


def _v1_rename(body: dict[str, Any]) -> dict[str, Any]:
    # the imagined v1 spelled the fields "old"/"new"
    return {"old_name": body["old"], "new_name": body["new"]}


@pytest.fixture()
def renamed_is_v2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(schema.CURRENT_VERSION, "ModelRenamed", 2)
    monkeypatch.setitem(schema.UPCASTERS, ("ModelRenamed", 1), _v1_rename)


def _v1_fields() -> dict[bytes, bytes]:
    return {b"type": b"ModelRenamed", b"v": b"1", b"agg": b"k", b"ver": b"3",
            b"time": b"2026-01-01T00:00:00+00:00", b"corr": b"", b"id": b"e1",
            b"body": orjson.dumps({"old": "a", "new": "b"})}


def test_an_old_entry_is_upcast_on_read(renamed_is_v2: None) -> None:
    event = decode("1-0", _v1_fields())
    assert isinstance(event, ModelRenamed)
    assert (event.old_name, event.new_name, event.schema_version, event.aggregate_version) == ("a", "b", 2, 3)


def test_a_missing_upcaster_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(schema.CURRENT_VERSION, "ModelRenamed", 2)
    with pytest.raises(EventDecodeError, match="no upcaster for ModelRenamed version 1"):
        decode("1-0", _v1_fields())


def test_readers_see_upcast_events_from_redis(renamed_is_v2: None, event_store: RedisEventStore) -> None:
    event_store.client.xadd(event_store.keys.events, _v1_fields())  # type: ignore[arg-type]
    [stored] = event_store.read()
    assert isinstance(stored.event, ModelRenamed) and stored.event.new_name == "b"
