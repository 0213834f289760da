"""Pausing, resuming and restarting install jobs.

A pause stops the job's downloads and keeps their partial files (``.part`` and its range state); the
resume runs the install step again as a new *attempt*, whose downloads continue those files with
ranges. A restart runs a failed or cancelled job again, claiming its source again in the same append
(another job may have taken it meanwhile: then the restart is refused naming it). A repo install that
failed in its downloads keeps the files it downloaded whole and verified (``InstallFileDownloaded``)
in its staging folder; the restart names them (``kept_files``) and its downloads fetch only the others.
``from_scratch`` keeps none.

Every attempt runs under RQ ids of its own (``InstallJob.run_id``) and its steps carry the attempt
number: a step of an earlier attempt that still runs sees that it was superseded and stops, without
touching the job or its staging folder. Each attempt has its own pause flag, so the new attempt's
steps never see the old one's.
"""

from __future__ import annotations

from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from modelbus.events.errors import ConcurrencyError, UniqueConstraintError
from modelbus.events.logs import get_logger
from modelbus.events.schema import InstallPaused, InstallRestarted, InstallResumed
from modelbus.events.store import RedisEventStore
from modelbus.services.config import AppConfig
from modelbus.services.install.commands import enqueue_install, register_job
from modelbus.services.install.defaults import APPEND_ATTEMPTS, CANCEL_FLAG_TTL
from modelbus.services.install.errors import InstallError, JobStateError
from modelbus.services.install.jobs import (
    PAUSABLE,
    RESTARTABLE,
    InstallJob,
    InstallStatus,
    load_job,
    transition,
)
from modelbus.services.install.kept import keepable
from modelbus.services.install.progress import ProgressBoard
from modelbus.services.install.sources import looks_like_path

log = get_logger(__name__)

_LIVE = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED}


def pause(store: RedisEventStore, job_id: str) -> InstallJob:
    """Stop a waiting or downloading job's downloads, keeping what they fetched."""
    def decide(job: InstallJob) -> InstallPaused:
        if job.status not in PAUSABLE:
            raise JobStateError(f"install job {job_id} is {job.status.value}: only a waiting or downloading "
                                "job can be paused")
        if looks_like_path(job.source):
            raise JobStateError(f"install job {job_id} copies a local file: only downloads can be paused")
        return InstallPaused(aggregate_id=job_id, reason="paused by request", correlation_id=job_id)

    job, _ = transition(store, job_id, decide)
    store.client.set(store.keys.pause_flag(job.run_id), b"1", ex=CANCEL_FLAG_TTL)
    log.info("install_paused", job=job_id)
    return job


def resume(store: RedisEventStore, config: AppConfig, job_id: str) -> InstallJob:
    """Run a paused job again; its downloads continue their partial files."""
    def decide(job: InstallJob) -> InstallResumed:
        if job.status is not InstallStatus.PAUSED:
            raise JobStateError(f"install job {job_id} is {job.status.value}: only a paused job can be resumed")
        return InstallResumed(aggregate_id=job_id, correlation_id=job_id)

    job, _ = transition(store, job_id, decide)
    register_job(store, job_id)
    enqueue_install(store, config, job_id, None, run_id=job.run_id, attempt=job.attempt)
    log.info("install_resumed", job=job_id, attempt=job.attempt)
    return job


def restart(store: RedisEventStore, config: AppConfig, job_id: str, *, from_scratch: bool = False) -> InstallJob:
    """Run a failed or cancelled job again once its last attempt's steps have all ended, keeping the files a
    failed download attempt left whole and verified (unless ``from_scratch``)."""
    for _ in range(APPEND_ATTEMPTS):
        job = load_job(store, job_id)
        if job.status not in RESTARTABLE:
            raise JobStateError(f"install job {job_id} is {job.status.value}: only a failed or cancelled job "
                                "can be restarted")
        busy = _live_steps(store, job)
        if busy:
            raise JobStateError(f"install job {job_id} is still stopping ({', '.join(busy)} not ended yet): "
                                "restart it in a moment")
        event = InstallRestarted(aggregate_id=job_id, previous_error=job.error, correlation_id=job_id,
                                 kept_files=[] if from_scratch else keepable(job), from_scratch=from_scratch)
        claims = {job.claim: job_id} if job.claim else {}
        try:
            store.append([event], expected_version=job.version, idempotency_key=event.event_id, claims=claims)
        except ConcurrencyError:
            continue
        except UniqueConstraintError as exc:
            raise JobStateError(f"install job {job_id}: its source is being installed by job {exc.owner} now; "
                                "follow that one") from exc
        job = load_job(store, job_id)
        store.client.delete(store.keys.cancel_flag(job_id))  # the failure told the old steps to stop
        ProgressBoard(store.client, store.keys).clear(job_id)  # the new attempt reports its files afresh
        register_job(store, job_id)
        enqueue_install(store, config, job_id, None, run_id=job.run_id, attempt=job.attempt)
        log.info("install_restarted", job=job_id, attempt=job.attempt, kept=len(job.kept_files),
                 from_scratch=from_scratch)
        return job
    raise InstallError(f"install job {job_id!r} kept changing under {APPEND_ATTEMPTS} attempts")


def _live_steps(store: RedisEventStore, job: InstallJob) -> list[str]:
    """The RQ steps of the job's current attempt that are still queued or running."""
    ids = [job.run_id, f"{job.run_id}-hash"]
    live = []
    for rq_id in ids:
        try:
            status = Job.fetch(rq_id, connection=store.client).get_status(refresh=False)
        except NoSuchJobError:  # expired, or never enqueued: nothing running
            continue
        if status in _LIVE:
            live.append(rq_id)
    return live
