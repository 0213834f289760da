"""An install job is the fold of its events: ``InstallRequested`` … ``InstallCompleted``/``Failed``/``Cancelled``.

The job id is the aggregate id (and the command id), so the job lives in the log: any process can
read it, and it survives the death of the worker running it and a restart of everything. Live byte
counts are operational, not history: they come from the progress board (:mod:`.progress`).

Every change is appended at the version the writer folded, so two workers (or a worker and a
cancel) racing on one job cannot both move it into a terminal state: the loser re-reads and sees
the job already ended.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import TYPE_CHECKING, Any

from modelbus.events.errors import ConcurrencyError
from modelbus.events.schema import (
    Event,
    InstallCancelled,
    InstallCompleted,
    InstallDownloaded,
    InstallFailed,
    InstallFileDownloaded,
    InstallJobChanged,
    InstallJobPayload,
    InstallPaused,
    InstallRequested,
    InstallRestarted,
    InstallResumed,
    InstallStagingReclaimed,
    InstallStarted,
)
from modelbus.events.store import EventStore, StoredEvent
from modelbus.events.validation import in_sequence
from modelbus.services.install.defaults import APPEND_ATTEMPTS
from modelbus.services.install.errors import InstallError, UnknownJobError

if TYPE_CHECKING:
    from modelbus.events.store import RedisEventStore
    from modelbus.services.install.progress import ProgressBoard

SOURCE_CLAIM_PREFIX = "install-source:"


class InstallStatus(str, Enum):
    WAITING = "waiting"
    DOWNLOADING = "downloading"
    PAUSED = "paused"
    DOWNLOADS_DONE = "downloads_done"
    HASHING = "hashing"
    COMPLETED = "completed"
    ERROR = "error"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({InstallStatus.COMPLETED, InstallStatus.ERROR, InstallStatus.CANCELLED})
TERMINAL_EVENTS = (InstallCompleted, InstallFailed, InstallCancelled)
#: a pause stops downloads (their partial files stay); hashing and placing run to their end
PAUSABLE = frozenset({InstallStatus.WAITING, InstallStatus.DOWNLOADING})
RESTARTABLE = frozenset({InstallStatus.ERROR, InstallStatus.CANCELLED})


@dataclass
class InstallJob:
    """What the spec's job shows: id, source, status, bytes, total_bytes; key/config when done,
    error_type/error when not."""

    id: str
    source: str
    status: InstallStatus = InstallStatus.WAITING
    bytes: int = 0
    total_bytes: int = 0
    key: str | None = None
    config: dict[str, Any] | None = None
    error_type: str | None = None
    error: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    download_path: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None
    version: int = 0
    #: live while it runs (the progress board): each file's (name, bytes done, size or None)
    files: list[tuple[str, int, int | None]] = field(default_factory=list)
    already_installed: bool = False  # completed with the key of the record that had this content already
    attempt: int = 0  # resumes and restarts so far: each runs under RQ ids of its own (``run_id``)
    #: files of a multi-file install whole and verified in its staging folder: path -> (size, sha256)
    downloaded: dict[str, tuple[int, str | None]] = field(default_factory=dict)
    kept_files: list[str] = field(default_factory=list)  # what the last restart or resume took over

    @property
    def run_id(self) -> str:
        """The RQ job id of this attempt's install step; its download and hash steps derive theirs from it."""
        return self.id if self.attempt == 0 else f"{self.id}-a{self.attempt}"

    @property
    def terminal(self) -> bool:
        return self.status.terminal

    @property
    def claim(self) -> str | None:
        """The unique field that marks this job's source as being installed (released when it ends)."""
        value = self.options.get("claim")
        return str(value) if value else None

    # spec-style predicates
    @property
    def waiting(self) -> bool:
        return self.status is InstallStatus.WAITING

    @property
    def complete(self) -> bool:
        return self.status is InstallStatus.COMPLETED

    @property
    def errored(self) -> bool:
        return self.status is InstallStatus.ERROR

    @property
    def cancelled(self) -> bool:
        return self.status is InstallStatus.CANCELLED


def source_claim(normalized_source: str) -> str:
    return SOURCE_CLAIM_PREFIX + normalized_source


def apply(job: InstallJob | None, event: Event) -> InstallJob | None:
    """The job after one event. Nothing changes a job once it ended (writers check too)."""
    if isinstance(event, InstallRequested):
        if job is not None:
            return job
        return InstallJob(id=event.aggregate_id, source=event.source, options=dict(event.options),
                          created_at=event.time, updated_at=event.time, version=event.aggregate_version)
    if job is None:
        return None
    job.version = max(job.version, event.aggregate_version)
    if isinstance(event, InstallRestarted) and job.status in RESTARTABLE:
        job.status, job.error_type, job.error = InstallStatus.WAITING, None, None
        job.bytes, job.download_path, job.attempt, job.updated_at = 0, None, job.attempt + 1, event.time
        job.kept_files = [f for f in event.kept_files if f in job.downloaded]
        job.downloaded = {f: job.downloaded[f] for f in job.kept_files}
        return job
    if isinstance(event, InstallStagingReclaimed):  # (also of an ended job: what a restart could keep is gone)
        job.downloaded, job.kept_files = {}, []
        return job
    if job.terminal:
        return job
    job.updated_at = event.time
    if isinstance(event, InstallStarted):
        if job.status is InstallStatus.WAITING:
            job.status = InstallStatus.DOWNLOADING
        elif job.status is InstallStatus.DOWNLOADS_DONE:
            job.status = InstallStatus.HASHING
    elif isinstance(event, InstallPaused):
        if job.status in PAUSABLE:
            job.status = InstallStatus.PAUSED
    elif isinstance(event, InstallResumed):
        if job.status is InstallStatus.PAUSED:
            job.status, job.attempt = InstallStatus.WAITING, job.attempt + 1
            job.kept_files = sorted(job.downloaded)  # the new attempt takes them over as they are
    elif isinstance(event, InstallFileDownloaded):
        if event.attempt == job.attempt:  # (a step of an attempt given up for dead may still report)
            job.downloaded[event.file] = (event.size, event.sha256)
    elif isinstance(event, InstallDownloaded):
        job.status = InstallStatus.DOWNLOADS_DONE
        job.download_path = event.path
        job.total_bytes = event.total_bytes or job.total_bytes
        job.bytes = job.total_bytes
        job.metadata = dict(event.metadata)
    elif isinstance(event, InstallCompleted):
        job.status = InstallStatus.COMPLETED
        job.key, job.config = event.key, dict(event.config)
        job.already_installed = event.already_installed
        job.total_bytes = event.total_bytes or job.total_bytes
        job.bytes = job.total_bytes
    elif isinstance(event, InstallFailed):
        job.status = InstallStatus.ERROR
        job.error_type, job.error = event.error_type, event.error
    elif isinstance(event, InstallCancelled):
        job.status = InstallStatus.CANCELLED
        job.error = event.reason
    return job


def fold(history: Sequence[StoredEvent]) -> InstallJob | None:
    job: InstallJob | None = None
    for stored in history:
        job = apply(job, stored.event)
    return job


def load_job(store: EventStore, job_id: str) -> InstallJob:
    """The job folded from its history; entries every reader refuses (events.validation) are left out."""
    job = fold(in_sequence(store.history(job_id), store.refuse))
    if job is None:
        raise UnknownJobError(f"no install job with id {job_id!r}")
    return job


def live_job(store: EventStore, board: ProgressBoard, job_id: str) -> InstallJob:
    """The job as :func:`load_job` folds it, with a running job's bytes and files from the progress board."""
    job = load_job(store, job_id)
    if not job.terminal:
        job.bytes, total, job.files = board.snapshot(job_id)
        job.total_bytes = total or job.total_bytes
    return job


def live_jobs(store: RedisEventStore, board: ProgressBoard) -> list[InstallJob]:
    """Every install job (the jobs index, oldest first), each as :func:`live_job` reads it."""
    ids = [raw.decode() if isinstance(raw, bytes) else str(raw) for raw in store.client.zrange(store.keys.jobs, 0, -1)]
    return [live_job(store, board, job_id) for job_id in ids]


Decide = Callable[[InstallJob], Event | None]


def transition(store: EventStore, job_id: str, decide: Decide, known: InstallJob | None = None,
               ) -> tuple[InstallJob, bool]:
    """Append what ``decide`` says given the job's current state, at that state's version.

    ``decide`` returns ``None`` to leave the job alone. Returns (the job after, whether appended).
    A terminal event releases the job's source claim in the same atomic append.

    ``known``: the job as the caller read it (or as the last transition left it), tried first without
    reading the history again: an append at its version fails if anything was written since, and then
    the job is read and decided again. Leaving the job alone is only ever decided on a fresh read.
    """
    for _ in range(APPEND_ATTEMPTS):
        job = _copy(known) if known is not None and known.id == job_id else load_job(store, job_id)
        event = decide(job)
        if event is None and known is not None:
            known = None
            job = load_job(store, job_id)
            event = decide(job)
        known = None
        if event is None:
            return job, False
        releases = [job.claim] if isinstance(event, TERMINAL_EVENTS) and job.claim else []
        after = apply(_copy(job), event.model_copy(update={"aggregate_version": job.version + 1}))
        assert after is not None
        # job state changes are also operational news: UIs follow the activity stream, not the log (published
        # by the append itself, in its round trip, once it has landed)
        news = InstallJobChanged(aggregate_id=job_id, correlation_id=job_id, payload=InstallJobPayload(
            job_id=job_id, status=after.status.value, event=event.type))
        try:
            store.append([event], expected_version=job.version, idempotency_key=event.event_id,
                         releases=releases, announce=[news])
        except ConcurrencyError:
            continue  # someone else wrote to this job first: decide again on what they wrote
        return after, True
    raise InstallError(f"install job {job_id!r} kept changing under {APPEND_ATTEMPTS} attempts")


def _copy(job: InstallJob) -> InstallJob:
    """A copy that :func:`apply` may change without changing the caller's job (the one container it
    changes in place is ``downloaded``)."""
    twin = copy.copy(job)
    twin.downloaded = dict(job.downloaded)
    return twin


def unless_ended(make: Callable[[InstallJob], Event]) -> Decide:
    """A decision that appends ``make(job)`` only while the job has not ended."""
    def decide(job: InstallJob) -> Event | None:
        return None if job.terminal else make(job)
    return decide
