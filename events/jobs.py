"""Jobs as every surface shows them: :class:`InstallJobView` for an install, :class:`LoadOutcome` and
:class:`UnloadOutcome` for the GPU workers' loads and unloads, :class:`ScanOutcome` and :class:`SyncOutcome`
for scans and syncs; the one shape each that the client returns and the API and the CLI print.

The job itself is the fold of its events (``services.install.jobs.InstallJob``); the view adds what is
live while it runs (bytes per file, from the progress board) and leaves out what a caller must not see
(the access token, the source claim). Like the activity payloads, a view's fields can also be read by
name (``job["state"]``), as callers did when jobs were dicts; ``model_dump(mode="json")`` is its JSON.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field

from modelbus.events.schema import NamedFields

#: the states in which a job has ended (every other state may still change)
TERMINAL_STATES = frozenset({"completed", "error", "cancelled"})


class _View(NamedFields):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileProgress(_View):
    """One file of a running job: bytes written so far, and its size when known."""

    path: str = Field(description="the file's path within the model, as its download names it")
    bytes: int = Field(default=0, ge=0)
    total_bytes: int | None = Field(default=None, ge=0)


class InstallJobView(_View):
    """An install job, folded from its events; ``bytes``, ``total_bytes`` and ``files`` are live while it
    runs. ``state`` is the job's status (the spec's name for it)."""

    id: str
    source: str
    state: str = Field(description="waiting, downloading, paused, downloads_done, hashing, completed, error, "
                       "cancelled")
    bytes: int = Field(default=0, ge=0)
    total_bytes: int = Field(default=0, ge=0)
    key: str | None = Field(default=None, description="the installed model's key, once completed")
    config: dict[str, Any] | None = Field(default=None, description="the installed model's record (JSON)")
    error_type: str | None = None
    error: str | None = None
    options: dict[str, Any] = Field(default_factory=dict, description="the install's options, secrets left out")
    files: tuple[FileProgress, ...] = Field(default=(), description="per-file progress while it runs")
    # ISO 8601 text, as the job dicts had them (the web page's templates cut and sort them as text)
    created_at: str | None = Field(default=None, description="when the job was requested (ISO 8601)")
    updated_at: str | None = Field(default=None, description="when its last event was written (ISO 8601)")
    already_installed: bool = Field(default=False, description="completed: the content was a record already (key)")
    attempt: int = Field(default=0, ge=0, description="resumes and restarts so far")
    downloaded_files: tuple[str, ...] = Field(default=(), description="files of a repo install downloaded whole "
                                              "and verified so far, by this attempt or kept from one before (a "
                                              "restart after a failed download keeps them)")
    kept_files: tuple[str, ...] = Field(default=(), description="files the last restart (or resume) keeps from the "
                                        "attempt before, which downloaded them whole and verified: not fetched "
                                        "again unless the staged file or the repo's size or sha256 differs now")

    @property
    def terminal(self) -> bool:
        """Whether the job has ended (completed, failed or cancelled)."""
        return self.state in TERMINAL_STATES


class LoadOutcome(NamedFields):
    """A load placed on a GPU worker: ``queued`` (not waited for: ``job_id`` follows it) or ``loaded``,
    with what the worker reported. Fields a newer worker adds are ignored (like its state)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    key: str
    state: str = Field(description="queued or loaded")
    job_id: str
    model_key: str | None = Field(default=None, description="the key the worker loaded (as it reported it)")
    submodel: str | None = None
    worker: str | None = Field(default=None, description="the GPU worker that loaded it")
    device: str | None = None
    location: str | None = Field(default=None, description="the files it was loaded from")
    precision: str | None = None
    seconds: float | None = Field(default=None, description="the worker's time for the load")


#: s a caller waits for a worker's answer to a CacheHitRequest before it loads through RQ (and a worker
#: skips a request older than this: its caller has gone the RQ way)
CACHE_HIT_WAIT = 1.0


class CacheHitRequest(NamedFields):
    """A load of a model that a GPU worker's heartbeat says it holds, sent to that worker's hit list
    (``Keys.gpu_hits``) instead of RQ: the worker answers from its cache, or says it no longer holds it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=r"^[0-9a-f]{32}$", description="the answer goes to Keys.gpu_reply(id)")
    model_key: str
    submodel: str | None = None
    sent: float = Field(description="the caller's wall-clock time; a worker skips requests older than the "
                        "caller waits")


class CacheHitReply(NamedFields):
    """The worker's answer: the load (``LoadOutcome`` fields, ``job_id`` = the request's id), or ``held``
    false when the model is not in its cache any more (the caller then loads it through RQ)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    held: bool
    outcome: LoadOutcome | None = None


class UnloadOutcome(NamedFields):
    """A model dropped from the GPU workers' caches: ``unloaded`` (by ``workers``) or ``not_loaded``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    state: str = Field(description="unloaded or not_loaded")
    workers: tuple[str, ...] = ()


class ScanOutcome(NamedFields):
    """A folder scanned for models, registered where they are."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    added: tuple[str, ...] = Field(default=(), description="keys of the models registered")


class SyncOutcome(NamedFields):
    """The records reconciled with the models directory."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    added: tuple[str, ...] = Field(default=(), description="keys of models found in the models directory and "
                                                           "registered")
    missing: tuple[str, ...] = Field(default=(), description="keys of records whose files are gone (kept: a "
                                                             "disk may be unmounted)")
    skipped: dict[str, str] = Field(default_factory=dict, description="path -> why it was not registered")


__all__ = ["TERMINAL_STATES", "FileProgress", "InstallJobView", "LoadOutcome", "ScanOutcome", "SyncOutcome",
           "UnloadOutcome"]
