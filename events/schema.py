"""The event schema: immutable pydantic models, one discriminated union, a schema version on each.

Domain events (the log stream) change state and are never trimmed; activity events (progress, job
states, model loads) are operational and capped. Old schema versions are upcast on read by the
functions registered in ``UPCASTERS``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


def _now() -> datetime:
    return datetime.now(UTC)


def _new_id() -> str:
    return uuid.uuid4().hex


class Event(BaseModel):
    """Fields every event carries. ``aggregate_version`` is assigned by the store on append."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: str
    schema_version: int = 1
    aggregate_id: str
    aggregate_version: int = 0
    time: datetime = Field(default_factory=_now)
    correlation_id: str | None = None
    event_id: str = Field(default_factory=_new_id)

    def body(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude=set(ENVELOPE_FIELDS))


ENVELOPE_FIELDS = ("type", "schema_version", "aggregate_id", "aggregate_version", "time", "correlation_id", "event_id")


# --- models -------------------------------------------------------------------------------------

class FileEntry(BaseModel):
    """One file a model owns, as recorded at its install.

    ``path`` is relative (POSIX separators, no ``..``) to the model's *base*: the model's path when that
    is a folder, else the folder holding the single file (whose entry is then just its name). ``blake3``
    is the hex BLAKE3 of the content; a content-addressed store names the blob by it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    size: int = Field(ge=0)
    blake3: str


class ModelAdded(Event):
    type: Literal["ModelAdded"] = "ModelAdded"
    schema_version: int = 2
    config: dict[str, Any]
    files: tuple[FileEntry, ...] = ()  # the model's manifest; empty in events written before it existed


class ModelUpdated(Event):
    type: Literal["ModelUpdated"] = "ModelUpdated"
    schema_version: int = 2
    changes: dict[str, Any]
    config: dict[str, Any]
    files: tuple[FileEntry, ...] | None = None  # a new manifest (the path changed and was hashed again)


class ModelRenamed(Event):
    type: Literal["ModelRenamed"] = "ModelRenamed"
    old_name: str
    new_name: str


class ModelRemoved(Event):
    type: Literal["ModelRemoved"] = "ModelRemoved"
    path: str | None = None


# --- installs (aggregate id = the install job id = the command id) ------------------------------

class InstallRequested(Event):
    type: Literal["InstallRequested"] = "InstallRequested"
    source: str
    options: dict[str, Any] = Field(default_factory=dict)


class InstallStarted(Event):
    type: Literal["InstallStarted"] = "InstallStarted"
    worker: str | None = None


class InstallDownloaded(Event):
    type: Literal["InstallDownloaded"] = "InstallDownloaded"
    path: str
    total_bytes: int = 0
    metadata: dict[str, Any] = Field(default_factory=dict)


class InstallCompleted(Event):
    type: Literal["InstallCompleted"] = "InstallCompleted"
    key: str
    config: dict[str, Any]
    total_bytes: int = 0


class InstallFailed(Event):
    type: Literal["InstallFailed"] = "InstallFailed"
    error_type: str
    error: str


class InstallCancelled(Event):
    type: Literal["InstallCancelled"] = "InstallCancelled"
    reason: str | None = None


# --- operational events (the activity stream) ---------------------------------------------------

class Activity(Event):
    """An operational event: ``kind`` names it (``model_load_started``, ``download_progress``...)."""

    type: Literal["Activity"] = "Activity"
    kind: str
    payload: dict[str, Any] = Field(default_factory=dict)


DomainEvent = Annotated[
    ModelAdded | ModelUpdated | ModelRenamed | ModelRemoved
    | InstallRequested | InstallStarted | InstallDownloaded | InstallCompleted | InstallFailed | InstallCancelled
    | Activity,
    Field(discriminator="type"),
]
EVENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(DomainEvent)

EVENT_TYPES: dict[str, type[Event]] = {
    cls.model_fields["type"].default: cls
    for cls in (ModelAdded, ModelUpdated, ModelRenamed, ModelRemoved, InstallRequested, InstallStarted,
                InstallDownloaded, InstallCompleted, InstallFailed, InstallCancelled, Activity)
}

# The current schema version of each type, and how to bring an older body up to date:
# UPCASTERS[(type, version)] turns a version-N body into a version-N+1 body.
CURRENT_VERSION: dict[str, int] = {name: cls.model_fields["schema_version"].default for name, cls in EVENT_TYPES.items()}
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


def _model_added_v1_to_v2(body: dict[str, Any]) -> dict[str, Any]:
    """Version 1 had no manifest: the files of such a model are not known from the log."""
    return {**body, "files": []}


def _model_updated_v1_to_v2(body: dict[str, Any]) -> dict[str, Any]:
    """Version 1 could not carry a new manifest: the manifest stays the one recorded before."""
    return {**body, "files": None}


UPCASTERS: dict[tuple[str, int], Upcaster] = {("ModelAdded", 1): _model_added_v1_to_v2,
                                              ("ModelUpdated", 1): _model_updated_v1_to_v2}


def activity(kind: str, payload: dict[str, Any], *, source: str = "modelbus",
             correlation_id: str | None = None) -> Activity:
    """Build an operational event; ``source`` becomes the aggregate id (a worker, a job...)."""
    return Activity(aggregate_id=source, kind=kind, payload=payload, correlation_id=correlation_id)
