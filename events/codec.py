"""Stream entries <-> events. An entry holds the envelope as separate fields and the body as orjson.

Decoding never crashes a reader: an unknown type, a newer schema version, or bad JSON raises
:class:`EventDecodeError`, which readers report and skip.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from pydantic import ValidationError

from events.errors import EventDecodeError
from events.schema import CURRENT_VERSION, EVENT_TYPES, UPCASTERS, Event


def encode(event: Event) -> dict[str, bytes]:
    """The stream fields of an event (aggregate_version is filled by the append script)."""
    return {
        "type": event.type.encode(),
        "v": str(event.schema_version).encode(),
        "agg": event.aggregate_id.encode(),
        "time": event.time.isoformat().encode(),
        "corr": (event.correlation_id or "").encode(),
        "id": event.event_id.encode(),
        "body": orjson.dumps(event.body()),
    }


def _text(fields: dict[Any, Any], name: str) -> str:
    value = fields.get(name.encode(), fields.get(name))
    if value is None:
        raise KeyError(name)
    return value.decode() if isinstance(value, bytes) else str(value)


def decode(position: str, fields: dict[Any, Any]) -> Event:
    try:
        type_name = _text(fields, "type")
        version = int(_text(fields, "v"))
    except (KeyError, ValueError) as exc:
        raise EventDecodeError(position, f"malformed entry ({type(exc).__name__}: {exc})") from exc
    cls = EVENT_TYPES.get(type_name)
    if cls is None:
        raise EventDecodeError(position, f"unknown event type {type_name!r}")
    current = CURRENT_VERSION[type_name]
    if version > current:
        raise EventDecodeError(position, f"{type_name} schema version {version} is newer than this reader's {current}")
    try:
        body = orjson.loads(_text(fields, "body"))
        envelope = {
            "aggregate_id": _text(fields, "agg"),
            "aggregate_version": int(_text(fields, "ver")) if (b"ver" in fields or "ver" in fields) else 0,
            "time": datetime.fromisoformat(_text(fields, "time")),
            "correlation_id": _text(fields, "corr") or None,
            "event_id": _text(fields, "id"),
        }
    except (KeyError, ValueError, orjson.JSONDecodeError) as exc:
        raise EventDecodeError(position, f"malformed {type_name} entry ({type(exc).__name__}: {exc})") from exc
    if not isinstance(body, dict):
        raise EventDecodeError(position, "body is not a JSON object")
    while version < current:
        upcast = UPCASTERS.get((type_name, version))
        if upcast is None:
            raise EventDecodeError(position, f"no upcaster for {type_name} version {version}")
        body = upcast(body)
        version += 1
    try:
        return cls(**body, **envelope, schema_version=version)
    except (ValidationError, TypeError) as exc:
        raise EventDecodeError(position, f"invalid {type_name}: {exc}") from exc
