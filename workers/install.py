"""The install queue's job: resolve a source, then fan out.

    run_install(job_id)
      local path, in place  -> InstallDownloaded(path)                 -> hash job
      local path, install   -> copy into staging, InstallDownloaded    -> hash job
      URL / HF / Civitai    -> one download job per file (download queue)
                               + a hash job that runs when they have all ended (hash queue)

RQ job ids are derived from the install job id (``<id>-dl<N>``, ``<id>-hash``), so a retried install
job that died half-way through the fan-out does not start a second copy of a download.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, NoReturn

import httpx
from rq import Callback, Queue, Retry, get_current_job
from rq.job import Dependency, Job

from modelbus.events.logs import get_logger
from modelbus.events.schema import InstallDownloaded, InstallStarted
from modelbus.events.store import RedisEventStore
from modelbus.services.config import AppConfig
from modelbus.services.download.cancel import Cancellation
from modelbus.services.download.network import download_client
from modelbus.services.install import defaults
from modelbus.services.install.imports import IMPORT_PATH, discard_hand_over
from modelbus.services.install.jobs import InstallJob, InstallStatus, load_job, transition
from modelbus.services.install.kept import clean_after_failure, take_over
from modelbus.services.install.placement import copy_into, remove_tree, size_of, source_files, staging_dir
from modelbus.services.install.progress import ProgressBoard, ProgressReporter
from modelbus.services.install.recording import probe_model
from modelbus.services.install.sources import LocalPlan, RemotePlan, resolve
from modelbus.services.install.steps import CancelWatcher, describe, error_name, fail_job, is_final
from modelbus.workers.context import current
from modelbus.workers.errors import LeaseLostError
from modelbus.workers.lease import current as current_lease
from modelbus.workers.lease import for_current_job

log = get_logger(__name__)

DOWNLOAD_FUNCTION = "modelbus.workers.download.run_download"
HASH_FUNCTION = "modelbus.workers.hash.run_hash"
FAILURE_CALLBACK = "modelbus.workers.install.on_job_failure"


def retries_left() -> int | None:
    job = get_current_job()
    return None if job is None else job.retries_left


def give_up(exc: BaseException) -> NoReturn:
    """Raise ``exc`` again after the install was ended with it (InstallFailed), so that RQ records the
    step as failed with its traceback (``rq info``, the failed registry), and does not retry it."""
    job = get_current_job()
    if job is not None:
        job.retries_left = 0
    raise exc


# Loading the CA bundle costs ~0.1 s: done once per worker process (forked jobs inherit it).
_TLS = httpx.create_ssl_context()


def http_client(config: AppConfig) -> httpx.Client:
    return download_client(allow_private=config.allow_private_downloads, proxy=config.download_proxy,
                           timeout=httpx.Timeout(15.0, read=config.download_stall_timeout), verify=_TLS,
                           headers={"User-Agent": "modelbus-install/0.1"}, hf_endpoint=config.hf_endpoint)


def run_install(job_id: str, access_token: str | None = None, attempt: int = 0) -> str:
    context = current()
    with for_current_job(context.store.client, context.store.keys, context.worker_id) as lease:
        if lease is not None and lease.done_before:
            return load_job(context.store, job_id).status.value  # delivered again: it already ran
        return _install(context.store, context.config, context.worker_id, job_id, access_token, attempt)


def not_for(job: InstallJob, attempt: int) -> str | None:
    """Why a step of ``attempt`` has nothing to do for the job as it is now (None: it has)."""
    if job.terminal:
        return job.status.value
    if job.attempt != attempt:
        log.info("install_step_superseded", job=job.id, attempt=attempt, current=job.attempt)
        return "superseded"
    if job.status is InstallStatus.PAUSED:
        return job.status.value
    return None


def _install(store: RedisEventStore, config: AppConfig, worker_id: str, job_id: str,
             access_token: str | None, attempt: int = 0) -> str:
    job = load_job(store, job_id)
    skip = not_for(job, attempt)
    if skip is not None:
        return skip
    job, first_run = transition(store, job_id, lambda j: InstallStarted(
        aggregate_id=job_id, worker=worker_id, correlation_id=job_id) if j.waiting else None, known=job)
    try:
        source = job.options.get(IMPORT_PATH) or job.source  # a hand-over copy stands for the user's path
        plan = resolve(source, config, job.options, lambda: http_client(config), access_token)
        if isinstance(plan, LocalPlan):
            _local(store, config, job, plan)
        else:
            _fan_out(store, config, job, plan, access_token, first_run)
    except LeaseLostError:
        raise  # given up for dead: the run that took the job over decides its outcome
    except Exception as exc:
        if not is_final(exc, retries_left()):
            log.warning("install_step_retry", job=job_id, error=describe(exc))
            raise
        clean_after_failure(config, job)  # first: whoever sees the error sees no leftovers (but kept files)
        discard_hand_over(config, job.options)
        fail_job(store, job_id, error_name(exc), describe(exc))
        give_up(exc)
    return load_job(store, job_id).status.value


def _local(store: RedisEventStore, config: AppConfig, job: InstallJob, plan: LocalPlan) -> None:
    if job.status is not InstallStatus.DOWNLOADING:
        # a retry after the copy was recorded: the hash step may already be reading it, leave it be
        _enqueue_hash(store, job, [], None, {})
        return
    path = plan.path
    source_files(path)  # no symlink out of the source, before any byte of it is read
    probe_model(path, job.options.get("config") or {})  # suffix and headers, before the copy
    if not job.options.get("inplace"):
        board = ProgressBoard(store.client, store.keys)
        board.set_total(job.id, size_of(path))
        cancellation = Cancellation()
        lease = current_lease()
        if lease is not None:
            cancellation.guard(lease.fence)  # a run given up for dead copies nothing more
        with CancelWatcher(store.client, store.keys, job.id, cancellation):
            reporter = ProgressReporter(board, store, job.id, "0", name=path.name)
            path = copy_into(path, staging_dir(config, job.id), reporter, check=cancellation.check)
    total = size_of(path)
    job, appended = transition(store, job.id, lambda j: InstallDownloaded(
        aggregate_id=job.id, path=str(path), total_bytes=total, correlation_id=job.id)
        if j.status is InstallStatus.DOWNLOADING else None, known=job)
    if not appended and job.terminal:
        remove_tree(staging_dir(config, job.id))  # cancelled while copying
        discard_hand_over(config, job.options)
        return
    _enqueue_hash(store, job, [], None, {})


def _fan_out(store: RedisEventStore, config: AppConfig, job: InstallJob, plan: RemotePlan,
             token: str | None, first_run: bool = True) -> None:
    board = ProgressBoard(store.client, store.keys)
    board.set_total(job.id, plan.total_bytes)
    queue = Queue(store.keys.queue("download"), connection=store.client)
    # a later attempt (resume, restart) keeps what the earlier ones downloaded whole (services.install.kept);
    # a retry of this attempt's install step leaves the folder to the downloads it already started
    kept = take_over(config, job, plan.folder, plan.files, tidy=first_run) if job.attempt and plan.folder else set()
    ids = []
    for index, file in enumerate(plan.files):
        if file.name in kept:
            size = job.downloaded[file.name][0]
            board.set_file(job.id, str(index), size, size, file.name)
            continue
        rq_id = f"{job.run_id}-dl{index}"
        ids.append(rq_id)
        if Job.exists(rq_id, connection=store.client):
            continue
        kwargs: dict[str, Any] = {"name": file.name, "size": file.size, "sha256": file.sha256,
                                  "folder": plan.folder}
        if token:
            kwargs["access_token"] = token
        if job.attempt:
            kwargs["attempt"] = job.attempt
        # a description of our own: RQ's default one (the call with its arguments) would put the URL and the
        # access token in every worker's log
        queue.enqueue(DOWNLOAD_FUNCTION, job.id, index, file.url, job_id=rq_id, description=f"download {rq_id}",
                      **_job_options(), **kwargs)
    _enqueue_hash(store, job, ids, plan.folder, plan.metadata)
    log.info("install_fanned_out", job=job.id, files=len(ids), kept=len(kept), total=plan.total_bytes)


def _enqueue_hash(store: RedisEventStore, job: InstallJob, after: list[str], folder: str | None,
                  metadata: dict[str, Any]) -> None:
    rq_id = f"{job.run_id}-hash"
    if Job.exists(rq_id, connection=store.client):
        return
    queue = Queue(store.keys.queue("hash"), connection=store.client)
    depends = Dependency(jobs=after, allow_failure=True) if after else None
    extra: dict[str, Any] = {"attempt": job.attempt} if job.attempt else {}
    options = {**extra, **_job_options(defaults.HASH_JOB_TIMEOUT)}
    if depends is not None:  # RQ reads the dependencies' state: its own round trips
        queue.enqueue(HASH_FUNCTION, job.id, folder=folder, metadata=metadata, job_id=rq_id, depends_on=depends,
                      **options)
        return
    with store.client.pipeline(transaction=True) as pipe:  # no dependency: the enqueue in one round trip
        pipe.multi()  # explicit, as RQ expects of a pipeline it is given
        queue.enqueue(HASH_FUNCTION, job.id, folder=folder, metadata=metadata, job_id=rq_id, pipeline=pipe,
                      **options)
        pipe.execute()


def _job_options(timeout: int = defaults.JOB_TIMEOUT) -> dict[str, Any]:
    return {"retry": Retry(defaults.JOB_RETRIES), "job_timeout": timeout, "result_ttl": defaults.RESULT_TTL,
            "failure_ttl": defaults.FAILURE_TTL, "on_failure": Callback(FAILURE_CALLBACK)}


def on_job_failure(job: Job, connection: Any, exc_type: type[BaseException] | None = None,
                   exc: BaseException | None = None, tb: TracebackType | None = None) -> None:
    """RQ's failure callback for every install step, also run for a job whose worker died.

    While RQ still retries the step there is nothing to do; after the last try the install ends in
    ``error`` naming the cause, instead of waiting forever for a step that will never run again.
    """
    if job.retries_left:
        return
    context = current()
    job_id = str(job.args[0])
    if not_for(load_job(context.store, job_id), int(job.kwargs.get("attempt") or 0)) == "superseded":
        return  # a step of an earlier attempt: the job has moved on without it
    name = exc_type.__name__ if exc_type is not None else "AbandonedJobError"
    message = describe(exc) if exc is not None and str(exc) else "the worker running it died"
    fail_job(context.store, job_id, name, f"{job.func_name} gave up after {defaults.JOB_RETRIES} retries: {message}")
    if job.func_name != HASH_FUNCTION:
        return  # the hash job still runs after the downloads (allow_failure) and cleans the staging
    ended = load_job(context.store, job_id)
    clean_after_failure(context.config, ended)
    discard_hand_over(context.config, ended.options)

