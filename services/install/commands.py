"""Submitting an install: one ``InstallRequested`` in the log, then one RQ job on the install queue.

The job id is the command id, so a repeated command finds its own event (idempotency key) and
returns the same job. The source is claimed in the same atomic append (``install-source:<source>``):
a second command for a source already being installed gets the running job instead. The RQ job is
enqueued by its import path: ``services`` never imports ``workers``.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from redis.client import Pipeline
from rq import Callback, Queue, Retry
from rq.job import Job

from modelbus.events.errors import ConcurrencyError, UniqueConstraintError
from modelbus.events.logs import get_logger
from modelbus.events.schema import InstallRequested
from modelbus.events.store import RedisEventStore
from modelbus.services.config import AppConfig
from modelbus.services.install import defaults
from modelbus.services.install.errors import CommandIdTakenError, InvalidCommandError, InvalidSourceError
from modelbus.services.install.imports import IMPORT_PATH, discard_hand_over, hand_over
from modelbus.services.install.jobs import load_job, source_claim
from modelbus.services.install.roots import check_local_source, refuse_nul
from modelbus.services.install.sources import (
    check_expected_hashes,
    check_file_globs,
    looks_like_path,
    normalize_source,
)

log = get_logger(__name__)

INSTALL_FUNCTION = "modelbus.workers.install.run_install"
FAILURE_CALLBACK = "modelbus.workers.install.on_job_failure"
# RQ job ids allow these only, and the install's RQ job id is the command id
_COMMAND_ID = re.compile(r"^[A-Za-z0-9_-]{1,100}$")


@dataclass
class InstallCommand:
    source: str
    options: dict[str, Any] = field(default_factory=dict)  # inplace, force, config, revision, variant...
    command_id: str | None = None
    access_token: str | None = None  # never written to the log: it travels with the RQ job only


def submit(store: RedisEventStore, config: AppConfig, command: InstallCommand) -> str:
    """Record and enqueue an install; returns its job id (an earlier one for a repeat or a busy source)."""
    job_id = command.command_id or uuid.uuid4().hex
    if not _COMMAND_ID.match(job_id):
        raise InvalidCommandError(f"command id {job_id!r}: use 1-100 letters, digits, '_' or '-'")
    _check_not_foreign(store, job_id)
    normalized = check_command_options(command.source, config, command.options)
    claim = source_claim(normalized)
    options = {**command.options, "claim": claim, "normalized_source": normalized}
    event = InstallRequested(aggregate_id=job_id, source=command.source, options=options, correlation_id=job_id)
    try:
        result = store.append([event], expected_version=0, idempotency_key=f"install:{job_id}",
                              claims={claim: job_id})
    except UniqueConstraintError as exc:
        running = _running_owner(store, exc.owner)
        if running is not None:
            log.info("install_source_busy", source=normalized, job=running)
            return running
        # the claim outlived its job (it should be released by the job's last event): go on without it
        log.warning("install_claim_stale", source=normalized, owner=exc.owner)
        options.pop("claim")
        event = event.model_copy(update={"options": options})
        return _append_unclaimed(store, config, command, event)
    except ConcurrencyError:
        log.info("install_job_exists", job=job_id)
        return job_id
    if result.duplicate:
        log.info("install_command_repeated", job=job_id)
        _ensure_enqueued(store, config, job_id, command.access_token)
        return job_id
    _register_and_enqueue(store, config, job_id, command.access_token)
    log.info("install_submitted", job=job_id, source=command.source)
    return job_id


def check_command_options(source: str, config: AppConfig, options: dict[str, Any], roots: bool = True) -> str:
    """Refuse a source or options no worker could act on, before anything is written; returns the source's
    normalized spelling. ``roots``: a local path must lie in the import roots (else the caller hands it over)."""
    refuse_nul(source)
    normalized = normalize_source(source, config, options)
    check_expected_hashes(source, config, options)
    check_file_globs(source, config, options)
    if looks_like_path(source.strip()):
        local = Path(options.get(IMPORT_PATH) or normalized)
        if roots:  # the workers read local files only inside the import roots: refused before anything is read
            local = check_local_source(local, config)
        if not os.path.exists(local):  # (not Path.exists: a name too long must be "no such file", not a crash)
            # workers share this file system (models dir and sources): refuse now rather than queue a failure
            raise InvalidSourceError(f"no such file or folder: {normalized}")
    return normalized


def submit_handing_over(store: RedisEventStore, config: AppConfig, command: InstallCommand) -> str:
    """:func:`submit`, after this process (the CLI, the client: the caller's own permissions) handed a
    local source outside the import roots over (services.install.imports). A copy that no job took (a
    refusal, a repeated command, a source already being installed) is removed again."""
    command = replace(command, command_id=command.command_id or uuid.uuid4().hex)
    options = hand_over(command.source, command.options, config)
    if IMPORT_PATH not in options or options is command.options:
        return submit(store, config, command)
    try:
        job_id = submit(store, config, replace(command, options=options))
        taken = load_job(store, job_id).options.get(IMPORT_PATH) == options[IMPORT_PATH]
    except BaseException:
        discard_hand_over(config, options)
        raise
    if not taken:
        discard_hand_over(config, options)
    return job_id


def _append_unclaimed(store: RedisEventStore, config: AppConfig, command: InstallCommand,
                      event: InstallRequested) -> str:
    job_id = event.aggregate_id
    try:
        result = store.append([event], expected_version=0, idempotency_key=f"install:{job_id}")
    except ConcurrencyError:
        return job_id
    if not result.duplicate:
        _register_and_enqueue(store, config, job_id, command.access_token)
    return job_id


def _check_not_foreign(store: RedisEventStore, job_id: str) -> None:
    """Refuse an id whose RQ job belongs to another namespace (RQ's job keys are not namespaced)."""
    origin = store.client.hget(f"{Job.redis_job_namespace_prefix}{job_id}", "origin")
    if origin and origin.decode() != store.keys.queue("install"):
        raise CommandIdTakenError(f"command id {job_id!r} is taken by a job of another namespace on this Redis "
                                  f"(queue {origin.decode()}): choose another id")


def _running_owner(store: RedisEventStore, owner: str) -> str | None:
    try:
        job = load_job(store, owner)
    except KeyError:
        return None
    return None if job.terminal else job.id


def _register(store: RedisEventStore, job_id: str, pipeline: Pipeline | None = None) -> None:
    (pipeline if pipeline is not None else store.client).zadd(store.keys.jobs, {job_id: time.time()}, nx=True)


register_job = _register  # (a resumed or restarted job is listed again, if it was pruned from the list)


def _register_and_enqueue(store: RedisEventStore, config: AppConfig, job_id: str, token: str | None) -> None:
    """The job index entry and the RQ job in one MULTI/EXEC: one round trip, and never one without the
    other. (A crash before it is repaired by repeating the command: see ``_ensure_enqueued``.)"""
    with store.client.pipeline(transaction=True) as pipe:
        pipe.multi()  # explicit, as RQ expects of a pipeline it is given (else it calls multi() itself)
        _register(store, job_id, pipe)
        enqueue_install(store, config, job_id, token, pipeline=pipe)
        pipe.execute()


def _ensure_enqueued(store: RedisEventStore, config: AppConfig, job_id: str, token: str | None) -> None:
    """A command repeated after a crash between the append and the enqueue still gets its RQ job."""
    _register(store, job_id)
    if load_job(store, job_id).waiting and not Job.exists(job_id, connection=store.client):
        enqueue_install(store, config, job_id, token)


def enqueue_install(store: RedisEventStore, config: AppConfig, job_id: str, token: str | None,
                    pipeline: Pipeline | None = None, *, run_id: str | None = None, attempt: int = 0) -> None:
    """Enqueue the install job (its id is the command id; a resumed or restarted attempt's is ``run_id``);
    with ``pipeline``, the job's commands are queued on it and the caller executes them."""
    queue = Queue(store.keys.queue("install"), connection=store.client)
    kwargs: dict[str, Any] = {"access_token": token} if token else {}
    if attempt:
        kwargs["attempt"] = attempt
    queue.enqueue_call(INSTALL_FUNCTION, args=(job_id,), kwargs=kwargs, job_id=run_id or job_id,
                       retry=Retry(defaults.JOB_RETRIES), timeout=defaults.JOB_TIMEOUT,
                       result_ttl=defaults.RESULT_TTL, failure_ttl=defaults.FAILURE_TTL,
                       on_failure=Callback(FAILURE_CALLBACK), description=f"install {run_id or job_id}",
                       pipeline=pipeline)
