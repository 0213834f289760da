"""Stream entries <-> events. An entry holds the envelope as separate fields and the body as orjson.

Decoding never crashes a reader: an unknown type, a newer schema version, or bad JSON raises
:class:`EventDecodeError`, which readers report and skip.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from datetime import datetime
from typing import Any, NamedTuple

import orjson
from pydantic import ValidationError

from modelbus.events.errors import EventDecodeError
from modelbus.events.schema import (
    CURRENT_VERSION,
    ENVELOPE_FIELDS,
    EVENT_TYPES,
    UPCASTERS,
    Event,
    activity_class,
)

_ENVELOPE = set(ENVELOPE_FIELDS)  # (a set: what pydantic's exclude takes)


def encode_body(event: Event) -> bytes:
    """The body as JSON (every field but the envelope), serialised by pydantic-core in one step, without
    building the intermediate dict of ``event.body()``. It reads back to the same values; unlike orjson it
    also writes integers beyond 64 bits (orjson reads those back as floats)."""
    return event.__pydantic_serializer__.to_json(event, exclude=_ENVELOPE)


def encode(event: Event) -> dict[str, bytes]:
    """The stream fields of an event (aggregate_version is filled by the append script)."""
    return {
        "type": event.type.encode(),
        "v": str(event.schema_version).encode(),
        "agg": event.aggregate_id.encode(),
        "time": event.time.isoformat().encode(),
        "corr": (event.correlation_id or "").encode(),
        "id": event.event_id.encode(),
        "body": encode_body(event),
    }


_NAMES = ("type", "v", "agg", "ver", "time", "corr", "id", "body")
_BYTE_NAMES = tuple((n.encode(), n) for n in _NAMES)


def _normalise(fields: dict[Any, Any]) -> dict[str, Any]:
    """Entry fields as text, whether redis-py gave bytes or str (the body stays as given: orjson reads both)."""
    out: dict[str, Any] = {}
    get = fields.get
    for raw_name, name in _BYTE_NAMES:
        v = get(raw_name)
        if v is None:
            v = get(name)
            if v is None:
                continue
        out[name] = v.decode() if (v.__class__ is bytes and name != "body") else v
    return out


def _envelope(fields: dict[Any, Any]) -> tuple[Any, ...]:
    """(type, v, agg, ver, time, corr, id, body), text except the body, None where absent."""
    try:  # what our appends write and redis-py returns: all eight, bytes keys and values
        return (fields[b"type"].decode(), fields[b"v"].decode(), fields[b"agg"].decode(),
                fields[b"ver"].decode(), fields[b"time"].decode(), fields[b"corr"].decode(),
                fields[b"id"].decode(), fields[b"body"])
    except (KeyError, AttributeError):
        f = _normalise(fields)  # str keys (decode_responses=True), fields missing, or odd values
        return tuple(f.get(name) for name in _NAMES)


class EventBody(NamedTuple):
    """An entry's envelope and its body, without the Event model built from them: what a replay needing a
    few fields of a few event types reads, since building the model costs more than fetching the entry.

    ``body`` is the (upcast) body, or its JSON text still unparsed when the entry is of the current
    schema: a replay parses only the bodies it needs (:meth:`parsed`), often a fraction of them. It has
    not been checked against the type's schema."""

    position: str
    type: str
    aggregate_id: str
    aggregate_version: int
    event_id: str
    body: Mapping[str, Any] | bytes

    def parsed(self) -> Mapping[str, Any]:
        """The body as a mapping; ValueError when its JSON is broken or not an object."""
        body = self.body
        if body.__class__ is not bytes:
            return body  # type: ignore[return-value]
        value = orjson.loads(body)
        if value.__class__ is not dict:
            raise ValueError("body is not a JSON object")
        return value


def _parts(position: str, fields: dict[Any, Any], types: Container[str] | None
           ) -> tuple[str, dict[str, Any], str, int, datetime, str | None, str] | None:
    """(type, upcast body, aggregate id, aggregate version, time, correlation id, event id) of an entry;
    None when ``types`` is given and the entry's type is not among them (its body is not parsed)."""
    try:
        type_name, v, agg, ver, when, corr, event_id, raw_body = _envelope(fields)
        if type_name is None or v is None:
            raise KeyError("type" if type_name is None else "v")
        version = int(v)
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise EventDecodeError(position, f"malformed entry ({type(exc).__name__}: {exc})") from exc
    if types is not None and type_name not in types:
        return None
    if type_name not in EVENT_TYPES:
        raise EventDecodeError(position, f"unknown event type {type_name!r}")
    current = CURRENT_VERSION[type_name]
    if version > current:
        raise EventDecodeError(position, f"{type_name} schema version {version} is newer than this reader's {current}")
    try:
        if agg is None or when is None or event_id is None or raw_body is None:
            raise KeyError(next(n for n, x in zip(("agg", "time", "id", "body"), (agg, when, event_id, raw_body),
                                                  strict=True) if x is None))
        body = orjson.loads(raw_body)
        if not isinstance(body, dict):
            raise EventDecodeError(position, "body is not a JSON object")
        while version < current:
            upcast = UPCASTERS.get((type_name, version))
            if upcast is None:
                raise EventDecodeError(position, f"no upcaster for {type_name} version {version}")
            body = upcast(body)
            version += 1
        return (type_name, body, agg, 0 if ver is None else int(ver), datetime.fromisoformat(when), corr or None,
                event_id)
    except EventDecodeError:
        raise
    except (KeyError, ValueError, TypeError, orjson.JSONDecodeError) as exc:
        raise EventDecodeError(position, f"malformed {type_name} entry ({type(exc).__name__}: {exc})") from exc


_CURRENT_V = {name: str(v).encode() for name, v in CURRENT_VERSION.items()}


def decode_body(position: str, fields: dict[Any, Any], types: Container[str]) -> EventBody | None:
    """The entry as an :class:`EventBody` when its type is one of ``types``, else None. A malformed
    envelope raises :class:`EventDecodeError` as :func:`decode` does; a broken body of the current
    schema is found when :meth:`EventBody.parsed` reads it."""
    # a replay's inner loop: entries as our appends write them (bytes, current schema, every field) take
    # this path; anything else goes through the checks of _parts, which raise the precise error
    try:
        type_name = fields[b"type"].decode()
        if type_name not in types:
            return None
        body = fields[b"body"]
        if fields[b"v"] == _CURRENT_V[type_name] and body.__class__ is bytes:
            datetime.fromisoformat(fields[b"time"].decode())
            return EventBody(position, type_name, fields[b"agg"].decode(), int(fields[b"ver"]),
                             fields[b"id"].decode(), body)
    except (KeyError, AttributeError, ValueError, TypeError):
        pass
    parts = _parts(position, fields, types)
    if parts is None:
        return None
    type_name, body, agg, ver, _, _, event_id = parts
    return EventBody(position, type_name, agg, ver, event_id, body)


def decode(position: str, fields: dict[Any, Any]) -> Event:
    parts = _parts(position, fields, None)
    assert parts is not None  # (no type filter)
    type_name, body, agg, ver, when, corr, event_id = parts
    body["type"] = type_name
    body["schema_version"] = CURRENT_VERSION[type_name]
    body["aggregate_id"] = agg
    body["aggregate_version"] = ver
    body["time"] = when
    body["correlation_id"] = corr
    body["event_id"] = event_id
    try:
        # the validator itself (what model_validate calls): this runs once per entry of every replay
        cls = activity_class(body.get("kind")) if type_name == "Activity" else EVENT_TYPES[type_name]
        event: Event = cls.__pydantic_validator__.validate_python(body)
        return event
    except ValidationError as exc:
        raise EventDecodeError(position, f"malformed {type_name} entry ({type(exc).__name__}: {exc})") from exc
