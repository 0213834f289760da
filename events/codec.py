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


def decode(position: str, fields: dict[Any, Any]) -> Event:
    try:
        f = _normalise(fields)
        type_name = f["type"]
        version = int(f["v"])
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise EventDecodeError(position, f"malformed entry ({type(exc).__name__}: {exc})") from exc
    cls = EVENT_TYPES.get(type_name)
    if cls is None:
        raise EventDecodeError(position, f"unknown event type {type_name!r}")
    current = CURRENT_VERSION[type_name]
    if version > current:
        raise EventDecodeError(position, f"{type_name} schema version {version} is newer than this reader's {current}")
    try:
        body = orjson.loads(f["body"])
        if not isinstance(body, dict):
            raise EventDecodeError(position, "body is not a JSON object")
        while version < current:
            upcast = UPCASTERS.get((type_name, version))
            if upcast is None:
                raise EventDecodeError(position, f"no upcaster for {type_name} version {version}")
            body = upcast(body)
            version += 1
        body.update(
            type=type_name, schema_version=version, aggregate_id=f["agg"],
            aggregate_version=int(f.get("ver", 0)), time=datetime.fromisoformat(f["time"]),
            correlation_id=f.get("corr") or None, event_id=f["id"],
        )
        return cls.model_validate(body)
    except EventDecodeError:
        raise
    except (KeyError, ValueError, TypeError, orjson.JSONDecodeError, ValidationError) as exc:
        raise EventDecodeError(position, f"malformed {type_name} entry ({type(exc).__name__}: {exc})") from exc
