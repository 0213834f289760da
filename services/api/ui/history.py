"""A model's history as the page shows it: one step per event of the model's log, each with what changed
and the record as it was right after it (a pure fold over the events ``GET .../history`` returns)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# record fields the page never offers to edit: identity, derived or checked by an install
READ_ONLY = frozenset({"key", "hash", "path", "model_type", "model_format", "source", "source_type",
                       "source_api_response", "file_size"})


@dataclass(frozen=True)
class Step:
    position: str
    type: str
    time: str
    correlation_id: str | None
    changes: dict[str, Any]  # field -> new value ({} for a removal)
    record: dict[str, Any] | None  # the record right after this event (None once removed)
    files: tuple[dict[str, Any], ...] = field(default=())


def fold(entries: list[dict[str, Any]]) -> list[Step]:
    """``entries`` as ``GET /api/v2/models/i/{key}/history`` serialises them, oldest first."""
    record: dict[str, Any] | None = None
    files: tuple[dict[str, Any], ...] = ()
    steps: list[Step] = []
    for entry in entries:
        event = entry["event"]
        kind = entry["type"]
        changes: dict[str, Any] = {}
        if kind == "ModelAdded":
            record = dict(event.get("config") or {})
            changes = dict(record)
            files = tuple(event.get("files") or ())
        elif kind == "ModelUpdated":
            before = record or {}
            record = dict(event.get("config") or before)
            changes = dict(event.get("changes") or {})
            if event.get("files") is not None:
                files = tuple(event["files"])
        elif kind == "ModelRenamed":
            record = {**(record or {}), "name": event.get("new_name")}
            changes = {"name": event.get("new_name")}
        elif kind == "ModelRemoved":
            record = None
        steps.append(Step(position=entry["position"], type=kind, time=str(event.get("time", "")),
                          correlation_id=event.get("correlation_id"), changes=changes,
                          record=None if record is None else dict(record), files=files))
    return steps


def at(steps: list[Step], position: str) -> Step | None:
    return next((s for s in steps if s.position == position), None)


def show(value: Any) -> str:
    """A field's value as one line of text."""
    if value is None:
        return "—"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) if value else "—"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) if value else "—"
    return str(value)
