"""The hash queue's job: the last step of an install, run once every download of it has ended.

It checks that the downloads are whole, then (services.install.finalize) identifies the model,
refuses a duplicate, moves it into ``models/<base>/<type>/<name>`` and appends the ``ModelAdded``,
and finally ``InstallCompleted``. It also cleans up: whatever happened, the staging folder of the
job is gone when this job has run. A cancel stops it within a fraction of a second even in the middle
of hashing or scanning a file: those loops check the job's cancel flag between chunks
(services.stopping).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from modelbus.events.logs import get_logger
from modelbus.events.schema import InstallCompleted, InstallDownloaded, InstallStarted
from modelbus.events.store import RedisEventStore
from modelbus.services.config import AppConfig
from modelbus.services.install.defaults import CANCEL_POLL_INTERVAL
from modelbus.services.install.errors import AlreadyInstalledError, InstallError, JobStoppedError
from modelbus.services.install.finalize import FinalizeRequest, finalize
from modelbus.services.install.imports import discard_hand_over
from modelbus.services.install.jobs import InstallJob, InstallStatus, load_job, transition, unless_ended
from modelbus.services.install.kept import clean_after_failure
from modelbus.services.install.placement import (
    model_in_staging,
    partial_files,
    remove_tree,
    size_of,
    staging_dir,
)
from modelbus.services.install.progress import ProgressBoard
from modelbus.services.install.repair import repair_files
from modelbus.services.install.steps import cancel_flag_set, describe, error_name, fail_job, is_final
from modelbus.services.records import ModelConfigBase, ModelRecordServiceBase
from modelbus.services.stopping import stop_on
from modelbus.workers.context import current
from modelbus.workers.errors import LeaseLostError
from modelbus.workers.install import give_up, not_for, retries_left
from modelbus.workers.lease import current as current_lease
from modelbus.workers.lease import for_current_job

log = get_logger(__name__)


def open_records(config: AppConfig, store: RedisEventStore) -> ModelRecordServiceBase:
    """The record service of one job: every read catches up with one round trip, without a log watch. A
    watch is a connection of its own that Redis tells of every append to the log, by any worker, while it
    is open: for the few reads of one job it costs Redis more than the round trips it saves."""
    return ModelRecordServiceBase.open(config.model_copy(update={"records_read_tracking": False}), event_store=store)


def run_hash(job_id: str, folder: str | None = None, metadata: dict[str, Any] | None = None,
             attempt: int = 0) -> str:
    context = current()
    with for_current_job(context.store.client, context.store.keys, context.worker_id) as lease:
        if lease is not None and lease.done_before:
            return load_job(context.store, job_id).status.value  # delivered again: it already ran
        job = load_job(context.store, job_id)
        skip = not_for(job, attempt)
        if skip in ("superseded", InstallStatus.PAUSED.value):
            return skip  # (a paused job's resume enqueues a hash step of its own)
        return _hash(context.store, context.config, job_id, folder, metadata, job)


def _hash(store: RedisEventStore, config: AppConfig, job_id: str, folder: str | None,
          metadata: dict[str, Any] | None, known: InstallJob | None = None) -> str:
    try:
        job = known if known is not None else load_job(store, job_id)
        if not job.terminal:
            with stop_on(_cancel_check(store, job_id)):
                _install(store, config, _downloaded(store, config, job, folder, metadata or {}))
    except LeaseLostError:
        raise  # given up for dead: the run that took the job over decides its outcome
    except JobStoppedError as exc:
        if not load_job(store, job_id).terminal:
            raise
        log.info("install_hash_stopped", job=job_id, reason=str(exc))  # cancelled: the cleanup below runs
    except Exception as exc:
        if not is_final(exc, retries_left()):
            log.warning("install_hash_retry", job=job_id, error=describe(exc))
            raise
        job = load_job(store, job_id)
        clean_after_failure(config, job)  # first: whoever sees the error sees no leftovers (but kept files)
        discard_hand_over(config, job.options)
        fail_job(store, job_id, error_name(exc), describe(exc))
        give_up(exc)
    job = load_job(store, job_id)
    if job.terminal:
        clean_after_failure(config, job)  # (a completed job's staging is gone already)
        discard_hand_over(config, job.options)
    return job.status.value


def _cancel_check(store: RedisEventStore, job_id: str) -> Callable[[], None]:
    """The stop check of this job's long work (hashing, pickle scanning): raises once it is cancelled.
    It looks at the cancel flag at most every CANCEL_POLL_INTERVAL, and keeps working while Redis is away."""
    last = [0.0]

    def check() -> None:
        now = time.monotonic()
        if now - last[0] < CANCEL_POLL_INTERVAL:
            return
        last[0] = now
        try:
            cancelled = cancel_flag_set(store.client, store.keys, job_id)
        except redis.RedisError:
            return
        if cancelled:
            raise JobStoppedError(f"install job {job_id} was cancelled while it was being identified")

    return check


def _downloaded(store: RedisEventStore, config: AppConfig, job: InstallJob, folder: str | None,
                metadata: dict[str, Any]) -> InstallJob:
    """Record that the downloads are done (remote sources), and that this step runs."""
    if job.status is InstallStatus.DOWNLOADING:
        path = model_in_staging(config, job.id, folder)
        if path is None or partial_files(path):
            raise InstallError(f"the download of {job.source} did not complete (no whole file in staging)")
        total = size_of(path)
        job, _ = transition(store, job.id, lambda j: InstallDownloaded(
            aggregate_id=j.id, path=str(path), total_bytes=total, metadata=metadata, correlation_id=j.id)
            if j.status is InstallStatus.DOWNLOADING else None, known=job)
    job, _ = transition(store, job.id, lambda j: InstallStarted(aggregate_id=j.id, correlation_id=j.id)
                        if j.status is InstallStatus.DOWNLOADS_DONE else None, known=job)
    return job


def _install(store: RedisEventStore, config: AppConfig, job: InstallJob) -> None:
    if job.terminal or job.download_path is None:
        return
    board = ProgressBoard(store.client, store.keys)
    path, inplace = Path(job.download_path), bool(job.options.get("inplace"))
    placed = board.placed(job.id)
    if placed is not None and placed.exists() and path.is_file() and os.path.samefile(path, placed):
        path.unlink()  # a retry: the worker died between linking the file into place and unlinking it here
    if not path.exists() and placed is not None and placed.exists():
        path, inplace = placed, True  # a retry: the model was moved into place before the worker died

    def still_wanted() -> None:
        lease = current_lease()
        if lease is not None:
            lease.fence()  # a run given up for dead moves nothing into place
        if cancel_flag_set(store.client, store.keys, job.id) or load_job(store, job.id).terminal:
            raise JobStoppedError(f"install job {job.id} ended while it was being finished")

    records = open_records(config, store)
    try:
        repair = job.options.get("repair")
        if repair:  # a download of a model's own source: only its broken files are put back
            still_wanted()
            replaced = repair_files(config, records, str(repair), path, config.hash_threads)
            remove_tree(staging_dir(config, job.id))
            log.info("install_repaired", job=job.id, key=repair, replaced=replaced)
            _complete(store, config, records, job, records.get_model(str(repair)), moved=False, already=True)
            return
        request = FinalizeRequest(
            path=path, inplace=inplace, job_id=job.id, user=job.options.get("config") or {},
            metadata=job.metadata, source=job.source, force=bool(job.options.get("force")),
            threads=config.hash_threads, on_claim=lambda target: board.set_placed(job.id, target),
            before_place=still_wanted, expected_blake3=job.options.get("blake3"))
        already = False
        try:
            record = finalize(config, records, request)
        except AlreadyInstalledError as exc:
            if request.force or not records.exists(exc.existing_key):
                raise
            record, already = records.get_model(exc.existing_key), True  # success: the record it already is
        remove_tree(staging_dir(config, job.id))  # before the completion: whoever sees it sees no leftovers
        discard_hand_over(config, job.options)
        _complete(store, config, records, job, record, moved=not job.options.get("inplace"), already=already)
    finally:
        records.close()


def _complete(store: RedisEventStore, config: AppConfig, records: ModelRecordServiceBase, job: InstallJob,
              record: ModelConfigBase, moved: bool, already: bool = False) -> None:
    target = config.model_path(record.path)
    total = size_of(target) if target.exists() else 0
    _, appended = transition(store, job.id, unless_ended(lambda j: InstallCompleted(
        aggregate_id=j.id, key=record.key, config=record.model_dump(mode="json"), total_bytes=total,
        already_installed=already, correlation_id=j.id)), known=job)
    if appended:
        log.info("install_completed", job=job.id, key=record.key, path=record.path, already_installed=already)
        return
    if already:
        return  # cancelled in the last moment: the record is another install's, it stays
    # cancelled (or failed elsewhere) in the last moment: take the model back out
    log.info("install_rolled_back", job=job.id, key=record.key)
    records.del_model(record.key, correlation_id=job.id)
    if moved:
        remove_tree(config.model_path(record.path))
