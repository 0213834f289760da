"""The event schema: immutable pydantic models, one discriminated union, a schema version on each.

Domain events (the log stream) change state and are never trimmed; activity events (progress, job
states, model loads) are operational and capped. Old schema versions are upcast on read by the
functions registered in ``UPCASTERS``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter


def _now() -> datetime:
    return datetime.now(UTC)


def _new_id() -> str:
    return uuid.uuid4().hex


class Event(BaseModel):
    """Fields every event carries. ``aggregate_version`` is assigned by the store on append.

    ``defer_build`` (here and on every model of this module): a class builds its validator when it first
    validates, so a process pays only for the events it meets (a CLI command starts in a fraction of the
    time that building all of them took); the behaviour is the same."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

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

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

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


# --- per-model data (aggregate id = the model's key; each patches the record it follows) ---------
#
# The bodies are plain JSON here (the event layer knows no record configs); services.records registers
# the checks that make them valid settings, phrases, links and covers (services.records.extras).

class ModelSettingsChanged(Event):
    """Default generation settings and/or trigger phrases set; a field absent (None) is left as it was."""

    type: Literal["ModelSettingsChanged"] = "ModelSettingsChanged"
    settings: dict[str, Any] | None = None  # the whole new default settings ({} clears them)
    trigger_phrases: tuple[str, ...] | None = None  # the whole new list


class ModelLinked(Event):
    """This model is related to ``target`` (a LoRA made for a main model, a VAE for a pipeline...)."""

    type: Literal["ModelLinked"] = "ModelLinked"
    target: str
    relation: str


class ModelUnlinked(Event):
    type: Literal["ModelUnlinked"] = "ModelUnlinked"
    target: str
    reason: str | None = None  # "removed" when the target was deleted


class ModelCoverChanged(Event):
    """A new cover image (WebP thumbnail, stored outside the log by its BLAKE3), or none (``cover`` None)."""

    type: Literal["ModelCoverChanged"] = "ModelCoverChanged"
    cover: dict[str, Any] | None = None


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
    already_installed: bool = False  # the content was a record already: ``key`` is that record's


class InstallFailed(Event):
    type: Literal["InstallFailed"] = "InstallFailed"
    error_type: str
    error: str


class InstallCancelled(Event):
    type: Literal["InstallCancelled"] = "InstallCancelled"
    reason: str | None = None


class InstallPaused(Event):
    """Downloads stop; their partial files stay for the resume (which continues them with ranges)."""

    type: Literal["InstallPaused"] = "InstallPaused"
    reason: str | None = None


class InstallResumed(Event):
    type: Literal["InstallResumed"] = "InstallResumed"


class InstallFileDownloaded(Event):
    """One file of a multi-file install is whole in the job's staging folder, verified against its published
    size and sha256 (``attempt``: the attempt whose download step fetched it). A restart keeps it."""

    type: Literal["InstallFileDownloaded"] = "InstallFileDownloaded"
    file: str = Field(min_length=1, max_length=4096, description="its path under the model's folder")
    size: int = Field(ge=0)
    sha256: str | None = None
    attempt: int = Field(default=0, ge=0)


class InstallRestarted(Event):
    """A failed or cancelled job runs again: its downloads fetch what ``kept_files`` does not name (files a
    failed attempt downloaded whole and verified, kept in its staging folder); ``from_scratch`` keeps none.
    Its source is claimed again in the same append."""

    type: Literal["InstallRestarted"] = "InstallRestarted"
    previous_error: str | None = None
    kept_files: list[str] = Field(default_factory=list)
    from_scratch: bool = False


class InstallStagingReclaimed(Event):
    """The staging janitor (``prune``) removed a staging folder older than ``MODELBUS_STAGING_TTL`` that no
    running job uses (a worker killed mid-install left it, or its job ended long ago and kept files for a
    restart). The aggregate is the job whose folder it was, else ``@staging`` (an in-process install's copy, a
    conversion's folder, a name no job has); a later restart of that job keeps nothing and downloads again."""

    type: Literal["InstallStagingReclaimed"] = "InstallStagingReclaimed"
    folder: str = Field(min_length=1, max_length=255, description="its name under the staging folder")
    files: int = Field(default=0, ge=0)
    bytes: int = Field(default=0, ge=0)
    modified: datetime = Field(description="the newest change inside it")


# --- the models directory (aggregate id ``models-dir``) -----------------------------------------

class ModelsDirPruned(Event):
    """``prune`` deleted these files (relative to the models directory) and folders: no record owned them."""

    type: Literal["ModelsDirPruned"] = "ModelsDirPruned"
    files: tuple[str, ...] = ()
    folders: tuple[str, ...] = ()
    bytes: int = 0


# --- operational events (the activity stream) ---------------------------------------------------
#
# Every activity event is an ``Activity`` on the wire: ``{"type": "Activity", "kind": ..., "payload": {...}}``
# (what subscribers, the SSE stream and the CLI's --json have always shown). Each known kind has its own
# class with a typed payload; a kind this reader does not know decodes as the plain ``Activity`` with a
# dict payload, so a newer writer's new kind reaches older readers instead of being dropped. The kinds
# share the schema version of ``Activity``: a change to a payload bumps it and registers an upcaster that
# looks at the body's ``kind``.

class NamedFields(BaseModel):
    """A model whose fields can also be read by name (``x["model_key"]``, ``x.get(...)``), as callers did when
    these values were dicts; a field with an alias (``from``) is found by either name."""

    model_config = ConfigDict(defer_build=True)  # (as Event's: built when first used)

    def _attribute(self, name: str) -> str | None:
        if name in type(self).model_fields:
            return name
        return next((n for n, f in type(self).model_fields.items() if f.alias == name), None)

    def __getitem__(self, name: str) -> Any:
        attribute = self._attribute(name)
        if attribute is None:
            raise KeyError(name)
        return getattr(self, attribute)

    def get(self, name: str, default: Any = None) -> Any:
        attribute = self._attribute(name)
        return default if attribute is None else getattr(self, attribute)


class Payload(NamedFields):
    """A typed activity payload; on the wire each field goes by its alias."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, serialize_by_alias=True,
                              defer_build=True)


def _unset(value: Any) -> bool:
    return value is None


ContextId = str | int | None  # the caller's queue/graph ids (the spec's invocation context), as it gave them


class LoadContext(Payload):
    """The spec's load payload fields shared by every model_load_* event, plus where the load ran."""

    queue_id: ContextId = None
    queue_item_id: ContextId = None
    queue_batch_id: ContextId = None
    graph_execution_state_id: ContextId = None
    model_key: str
    submodel: str | None = None
    hash: str | None = None
    location: str
    precision: str
    worker: str | None = None
    device: str


class LoadPayload(LoadContext):
    cache_hit: bool
    seconds: float
    bytes: int
    resident_bytes: int | None = None  # on the execution device (less than bytes: streamed), when known


class LoadFailedPayload(LoadContext):
    error: str


class CacheEvictedPayload(Payload):
    key: str
    model_key: str | None = None
    submodel: str | None = None
    bytes: int
    from_: str = Field(alias="from")  # the tier it left: vram, ram
    to: str  # where it went: ram, out
    reason: str
    worker: str | None = Field(default=None, exclude_if=_unset)


class InstallJobPayload(Payload):
    job_id: str
    status: str
    event: str  # the domain event that moved the job (InstallStarted, InstallCompleted...)


class InstallProgressPayload(Payload):
    job_id: str
    file: str
    bytes: int
    total_bytes: int | None = None


class DownloadPart(Payload):
    path: str
    bytes: int
    total_bytes: int | None = None


class DownloadPayload(Payload):
    id: int
    source: str
    path: str | None = None
    status: str
    bytes: int
    total_bytes: int | None = None
    rate: float
    parts: tuple[DownloadPart, ...] | None = Field(default=None, exclude_if=_unset)
    error_type: str | None = Field(default=None, exclude_if=_unset)
    error: str | None = Field(default=None, exclude_if=_unset)


class FetchPayload(Payload):
    """A GPU worker fetching a model's blobs from the model store into its host cache (services.store.fetcher)."""

    model_key: str
    worker: str | None = None


class FetchStartedPayload(FetchPayload):
    blobs: int
    total_bytes: int


class FetchProgressPayload(FetchPayload):
    bytes: int
    total_bytes: int


class FetchCompletedPayload(FetchPayload):
    bytes: int
    seconds: float


class FetchFailedPayload(FetchPayload):
    error: str


class Activity(Event):
    """An operational event: ``kind`` names it (``model_load_started``, ``download_progress``...). This class
    itself carries a kind this reader does not know; known kinds are the subclasses below."""

    type: Literal["Activity"] = "Activity"
    kind: str
    payload: Any = Field(default_factory=dict)


class ModelLoadStarted(Activity):
    kind: Literal["model_load_started"] = "model_load_started"
    payload: LoadPayload


class ModelLoadCompleted(Activity):
    kind: Literal["model_load_completed"] = "model_load_completed"
    payload: LoadPayload


class ModelLoadFailed(Activity):
    kind: Literal["model_load_failed"] = "model_load_failed"
    payload: LoadFailedPayload


class CacheEvicted(Activity):
    kind: Literal["cache_evicted"] = "cache_evicted"
    payload: CacheEvictedPayload


class InstallJobChanged(Activity):
    kind: Literal["install_job"] = "install_job"
    payload: InstallJobPayload


class InstallProgress(Activity):
    kind: Literal["install_progress"] = "install_progress"
    payload: InstallProgressPayload


class DownloadStarted(Activity):
    kind: Literal["download_started"] = "download_started"
    payload: DownloadPayload


class DownloadProgress(Activity):
    kind: Literal["download_progress"] = "download_progress"
    payload: DownloadPayload


class DownloadPaused(Activity):
    kind: Literal["download_paused"] = "download_paused"
    payload: DownloadPayload


class DownloadStopped(Activity):
    """A download cancelled by its caller (the kind keeps its old name)."""

    kind: Literal["download_cancelled"] = "download_cancelled"
    payload: DownloadPayload


class DownloadCompleted(Activity):
    kind: Literal["download_complete"] = "download_complete"
    payload: DownloadPayload


class DownloadFailed(Activity):
    kind: Literal["download_error"] = "download_error"
    payload: DownloadPayload


class ModelFetchStarted(Activity):
    kind: Literal["model_fetch_started"] = "model_fetch_started"
    payload: FetchStartedPayload


class ModelFetchProgress(Activity):
    kind: Literal["model_fetch_progress"] = "model_fetch_progress"
    payload: FetchProgressPayload


class ModelFetchCompleted(Activity):
    kind: Literal["model_fetch_completed"] = "model_fetch_completed"
    payload: FetchCompletedPayload


class ModelFetchFailed(Activity):
    kind: Literal["model_fetch_failed"] = "model_fetch_failed"
    payload: FetchFailedPayload


ACTIVITY_CLASSES: tuple[type[Activity], ...] = (
    ModelLoadStarted, ModelLoadCompleted, ModelLoadFailed, CacheEvicted, InstallJobChanged, InstallProgress,
    DownloadStarted, DownloadProgress, DownloadPaused, DownloadStopped, DownloadCompleted, DownloadFailed,
    ModelFetchStarted, ModelFetchProgress, ModelFetchCompleted, ModelFetchFailed)
#: kind -> its class; ``activity_class`` falls back to the plain Activity for a kind not listed
ACTIVITY_KINDS: dict[str, type[Activity]] = {cls.model_fields["kind"].default: cls for cls in ACTIVITY_CLASSES}
LOAD_EVENT_KINDS: tuple[str, ...] = ("model_load_started", "model_load_completed", "model_load_failed")


def activity_class(kind: object) -> type[Activity]:
    return ACTIVITY_KINDS.get(kind, Activity) if isinstance(kind, str) else Activity


def _activity_tag(value: Any) -> str:
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return kind if isinstance(kind, str) and kind in ACTIVITY_KINDS else "Activity"


ActivityEvent = Annotated[
    Annotated[ModelLoadStarted, Tag("model_load_started")] | Annotated[ModelLoadCompleted, Tag("model_load_completed")]
    | Annotated[ModelLoadFailed, Tag("model_load_failed")] | Annotated[CacheEvicted, Tag("cache_evicted")]
    | Annotated[InstallJobChanged, Tag("install_job")] | Annotated[InstallProgress, Tag("install_progress")]
    | Annotated[DownloadStarted, Tag("download_started")] | Annotated[DownloadProgress, Tag("download_progress")]
    | Annotated[DownloadPaused, Tag("download_paused")] | Annotated[DownloadStopped, Tag("download_cancelled")]
    | Annotated[DownloadCompleted, Tag("download_complete")] | Annotated[DownloadFailed, Tag("download_error")]
    | Annotated[ModelFetchStarted, Tag("model_fetch_started")]
    | Annotated[ModelFetchProgress, Tag("model_fetch_progress")]
    | Annotated[ModelFetchCompleted, Tag("model_fetch_completed")]
    | Annotated[ModelFetchFailed, Tag("model_fetch_failed")]
    | Annotated[Activity, Tag("Activity")],
    Discriminator(_activity_tag),
]


DomainEvent = Annotated[
    ModelAdded | ModelUpdated | ModelRenamed | ModelRemoved
    | ModelSettingsChanged | ModelLinked | ModelUnlinked | ModelCoverChanged
    | InstallRequested | InstallStarted | InstallDownloaded | InstallCompleted | InstallFailed | InstallCancelled
    | InstallPaused | InstallResumed | InstallRestarted | InstallFileDownloaded | InstallStagingReclaimed
    | ModelsDirPruned,
    Field(discriminator="type"),
]
#: any event of either stream
AnyEvent = DomainEvent | ActivityEvent
EVENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(AnyEvent, config=ConfigDict(defer_build=True))
ACTIVITY_ADAPTER: TypeAdapter[Any] = TypeAdapter(ActivityEvent, config=ConfigDict(defer_build=True))

EVENT_TYPES: dict[str, type[Event]] = {
    cls.model_fields["type"].default: cls
    for cls in (ModelAdded, ModelUpdated, ModelRenamed, ModelRemoved, InstallRequested, InstallStarted,
                InstallDownloaded, InstallCompleted, InstallFailed, InstallCancelled, Activity,
                InstallPaused, InstallResumed, InstallRestarted, InstallFileDownloaded, InstallStagingReclaimed,
                ModelsDirPruned,
                ModelSettingsChanged, ModelLinked, ModelUnlinked, ModelCoverChanged)
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


def activity(kind: str, payload: Mapping[str, Any] | Payload, *, source: str = "modelbus",
             correlation_id: str | None = None) -> Activity:
    """Build an operational event of ``kind`` (its typed class when the kind is known: a payload that does
    not fit raises pydantic's ValidationError); ``source`` becomes the aggregate id (a worker, a job...)."""
    cls = activity_class(kind)
    if cls is Activity:
        return Activity(aggregate_id=source, kind=kind, payload=dict(payload), correlation_id=correlation_id)
    return cls(aggregate_id=source, kind=kind, payload=payload, correlation_id=correlation_id)
