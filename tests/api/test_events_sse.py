"""GET /api/v2/events over a real uvicorn server: live delivery, type filter, Last-Event-ID resume."""

from __future__ import annotations

from collections.abc import Iterator

import httpx

from modelbus.events.store import RedisEventStore
from tests.fixtures.activity import payload_of


def read_events(response: httpx.Response) -> Iterator[dict[str, str]]:
    """Parse an SSE body into messages (comments and retry lines are skipped)."""
    message: dict[str, str] = {}
    for line in response.iter_lines():
        if not line:
            if "data" in message:
                yield message
            message = {}
        elif not line.startswith((":", "retry:")):
            field, _, value = line.partition(":")
            message[field] = value.lstrip()


def _publish(store: RedisEventStore, kinds: list[str]) -> str:
    """Publish the events; returns the resume token of the moment before them (a stream opened from it
    sees them all, however late it starts)."""
    since = f"{store.head('events')},{store.head('activity')}"
    for i, kind in enumerate(kinds):
        store.publish_activity(kind, payload_of(kind, bytes=i))
    return since


def test_sse_delivers_filtered_events_and_resumes(live_api: str, event_store: RedisEventStore) -> None:
    store = event_store
    with httpx.Client(base_url=live_api, timeout=10) as http:
        since = _publish(store, ["download_progress", "model_load_started", "model_load_completed",
                                 "model_load_started"])
        got = []
        params = {"types": "model_load_started,model_load_completed", "since": since}
        with http.stream("GET", "/api/v2/events", params=params) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for message in read_events(r):
                got.append(message)
                if len(got) == 3:
                    break
        assert [m["event"] for m in got] == ["model_load_started", "model_load_completed", "model_load_started"]
        # resume after the first: the other two arrive again, nothing before
        headers = {"Last-Event-ID": got[0]["id"]}
        params = {"types": ["model_load_started", "model_load_completed"]}
        with http.stream("GET", "/api/v2/events", params=params, headers=headers) as r:
            again = []
            for message in read_events(r):
                again.append(message)
                if len(again) == 2:
                    break
        assert [m["id"] for m in again] == [m["id"] for m in got[1:]]


def test_sse_bad_last_event_id_is_422(live_api: str) -> None:
    r = httpx.get(f"{live_api}/api/v2/events", headers={"Last-Event-ID": "garbage"}, timeout=10)
    assert r.status_code == 422 and "not an event position" in r.json()["error"]["message"]
