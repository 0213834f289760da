"""Live events from both streams (the domain log and the activity stream) as one ordered iterator.

The resume token (``Delivered.cursor``) holds the last position delivered on *each* stream, so a
subscriber that reconnects with it (the SSE ``Last-Event-ID``, or ``since=``) sees every later event
exactly once. Redis going away is not an error for a subscriber: it retries with backoff from its
cursor until Redis answers again (or ``reconnect_timeout`` passes).

Entries of the domain log are checked as every reader checks them (events.validation): what fails is
quarantined and skipped, never delivered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from modelbus.events import defaults as event_defaults
from modelbus.events.codec import decode
from modelbus.events.errors import EventDecodeError, StoreUnavailableError
from modelbus.events.logs import get_logger
from modelbus.events.schema import EVENT_TYPES, Event
from modelbus.events.store import RedisEventStore, StoredEvent, Stream, position_key, refusal_of
from modelbus.events.validation import Refusal, body_problem
from modelbus.services.client import defaults
from modelbus.services.client.errors import InvalidRequestError, UnavailableError

log = get_logger(__name__)

DOMAIN_TYPES = frozenset(name for name in EVENT_TYPES if name != "Activity")
START = "0-0"


def event_type(event: Event) -> str:
    """What a type filter matches: the domain event's type, or an activity event's ``kind``."""
    return getattr(event, "kind", None) or event.type


@dataclass(frozen=True, slots=True)
class Cursor:
    """The last position seen on each stream; ``str()`` is the resume token."""

    events: str
    activity: str

    def __str__(self) -> str:
        return f"{self.events},{self.activity}"

    def advance(self, stream: Stream, position: str) -> Cursor:
        if stream == "events":
            return Cursor(position, self.activity)
        return Cursor(self.events, position)

    @staticmethod
    def parse(text: str) -> Cursor:
        """``"0"`` (from the start), one position (a moment, applied to both streams: stream ids are
        milliseconds), or a token ``"<events>,<activity>"`` from an earlier delivery."""
        parts = [p.strip() for p in text.strip().split(",")]
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2 or not all(_is_position(p) for p in parts):
            raise InvalidRequestError(
                f"not an event position: {text!r} (use '$', '0', '<ms>-<seq>' or a token '<pos>,<pos>')")
        return Cursor(*(_normal(p) for p in parts))


def _is_position(text: str) -> bool:
    ms, sep, seq = text.partition("-")
    return ms.isdigit() and (not sep or seq.isdigit())


def _normal(text: str) -> str:
    return text if "-" in text else f"{text}-0"


@dataclass(frozen=True, slots=True)
class Delivered:
    """One event as a subscriber receives it: the typed event, where it sits, and the resume token."""

    event: Event
    stream: Stream
    position: str
    cursor: Cursor

    @property
    def type(self) -> str:
        return event_type(self.event)

    def to_dict(self) -> dict[str, Any]:
        return {"id": str(self.cursor), "stream": self.stream, "position": self.position, "type": self.type,
                "event": self.event.model_dump(mode="json")}

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())


def streams_for(types: Iterable[str] | None) -> tuple[Stream, ...]:
    """Which streams can hold the wanted types (activity kinds are open-ended, domain types are not)."""
    if not types:
        return ("events", "activity")
    wanted = set(types)
    out: list[Stream] = []
    if wanted & DOMAIN_TYPES:
        out.append("events")
    if wanted - DOMAIN_TYPES:
        out.append("activity")
    return tuple(out)


def merge_key(position: str, event: Event | None) -> tuple[int, float, int]:
    """Order across the two streams: their ids are milliseconds with per-stream sequence numbers, so
    within one millisecond the events' own (microsecond) times decide."""
    ms, seq = position_key(position)
    return ms, event.time.timestamp() if event is not None else 0.0, seq


class Subscription:
    """A blocking iterator over new events; see the module docstring."""

    def __init__(self, store: RedisEventStore, *, types: Iterable[str] | None = None, since: str = "$",
                 stop: Callable[[], bool] | None = None, block_ms: int = event_defaults.SUBSCRIBE_BLOCK_MS,
                 reconnect_timeout: float | None = None) -> None:
        self.store = store
        self.types = frozenset(t for t in (types or ()) if t) or None
        self.streams = streams_for(self.types)
        self.stop = stop or (lambda: False)
        self.block_ms = block_ms
        self.reconnect_timeout = reconnect_timeout
        self.since = since
        self.cursor: Cursor | None = None if since.strip() == "$" else Cursor.parse(since)
        self._gate = store.gate()

    def start(self) -> Subscription:
        """Fix ``"$"`` to the streams' current heads now (else it is fixed on the first ``next()``)."""
        if self.cursor is None:
            self.cursor = self._retrying(lambda: Cursor(self.store.head("events"), self.store.head("activity")))
        return self

    def __iter__(self) -> Iterator[Delivered]:
        self.start()
        if self.cursor is None:  # stopped before Redis answered
            return
        keys = {"events": self.store.keys.events, "activity": self.store.keys.activity}
        while not self.stop():
            cursor = self.cursor
            request = {keys[s]: getattr(cursor, s) for s in self.streams}
            reply = self._retrying(lambda request=request: self.store.client.xread(  # type: ignore[misc]
                request, count=event_defaults.READ_BATCH, block=self.block_ms))
            for delivered in self._decode(reply or []):
                self.cursor = delivered.cursor
                if _matches(self.types, delivered.stream, delivered.event):
                    yield delivered

    def _decode(self, reply: list[Any]) -> list[Delivered]:
        """Entries of both streams merged in order; the cursor moves past undecodable ones too."""
        entries: list[tuple[Any, Stream, str, Event | None]] = []
        for raw_key, items in reply:
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            stream: Stream = "events" if key == self.store.keys.events else "activity"
            decoded = [(position, self._decode_one(stream, position, fields)) for position, fields in
                       ((raw_id.decode() if isinstance(raw_id, bytes) else raw_id, fields) for raw_id, fields in items)]
            if stream == "events":
                admitted = {s.position for s in self._gate.admit(
                    [StoredEvent(p, e) for p, e in decoded if e is not None])}
                decoded = [(p, e if p in admitted else None) for p, e in decoded]
            entries += [(merge_key(p, e), stream, p, e) for p, e in decoded]
        entries.sort(key=lambda e: e[0])
        out: list[Delivered] = []
        cursor = self.cursor or Cursor(START, START)
        for _, stream, position, found in entries:
            cursor = cursor.advance(stream, position)
            if found is None:
                self.cursor = cursor
                continue
            out.append(Delivered(found, stream, position, cursor))
        return out

    def _decode_one(self, stream: Stream, position: str, fields: Any) -> Event | None:
        """The entry's event; None when it is unreadable, or refused (domain log entries are quarantined)."""
        try:
            event = decode(position, fields)
        except EventDecodeError as exc:
            if stream == "events":
                self.store.refuse(refusal_of(position, fields, exc.reason))
            else:
                log.warning("event_skipped", position=exc.position, reason=exc.reason)
            return None
        reason = body_problem(event.type, event.aggregate_id, event.__dict__) if stream == "events" else None
        if reason is not None:
            self.store.refuse(Refusal(position, event.type, event.aggregate_id, event.aggregate_version, reason))
            return None
        return event

    def _retrying(self, call: Callable[[], Any]) -> Any:
        """Run ``call``; while Redis is away, wait and retry (the cursor is kept, nothing is lost)."""
        started = time.monotonic()
        delay = defaults.RECONNECT_BACKOFF_BASE
        while True:
            try:
                return call()
            except (redis.ConnectionError, redis.TimeoutError, StoreUnavailableError) as exc:
                waited = time.monotonic() - started
                if self.reconnect_timeout is not None and waited >= self.reconnect_timeout:
                    raise UnavailableError(f"event stream lost: Redis unreachable for {waited:.0f}s: {exc}") from exc
                if self.stop():
                    return None
                log.warning("subscription_reconnecting", error=str(exc), delay=delay, cursor=str(self.cursor))
                time.sleep(delay)
                delay = min(delay * 2, defaults.RECONNECT_BACKOFF_CAP)


def read_history(store: RedisEventStore, *, types: Iterable[str] | None = None, since: str = "0",
                 limit: int = 1000) -> list[Delivered]:
    """Up to ``limit`` past events after ``since`` from both streams, merged in position order."""
    wanted = frozenset(t for t in (types or ()) if t) or None
    start = Cursor.parse(since)
    found: list[tuple[Any, Stream, StoredEvent]] = []
    for stream in streams_for(wanted):
        after, kept = getattr(start, stream), 0
        gate = store.gate()
        while kept < limit:
            batch = store.read(after, stream=stream)
            if not batch:
                break
            after = batch[-1].position
            for stored in (gate.admit(batch) if stream == "events" else batch):
                if _matches(wanted, stream, stored.event):
                    found.append((merge_key(stored.position, stored.event), stream, stored))
                    kept += 1
    found.sort(key=lambda f: f[0])
    out: list[Delivered] = []
    cursor = start
    for _, stream, stored in found[:limit]:
        cursor = cursor.advance(stream, stored.position)
        out.append(Delivered(stored.event, stream, stored.position, cursor))
    return out


def _matches(wanted: frozenset[str] | None, stream: Stream, event: Event) -> bool:
    return wanted is None or event_type(event) in wanted or (stream == "activity" and "Activity" in wanted)
