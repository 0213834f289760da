"""Scans and syncs on a worker: what the API runs instead of finding models in its own process.

Finding models reads file headers and unpickles checkpoints, so the API enqueues the work on the hash
queue (``workers.scan``) and waits for the answer. No live worker on that queue is 503 at once (a job
nobody reads would only time out); a worker that does not answer in time is 504 (the job goes on); an
error the worker met comes back as an error of the same kind (a folder outside the import roots is
403, a missing one 422).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis
from rq import Queue
from rq.job import Job

from modelbus.events.connection import redis_errors_translated
from modelbus.events.errors import Conflict, Forbidden, Kind, TooLarge
from modelbus.events.keys import Keys
from modelbus.services import routing
from modelbus.services.client import defaults
from modelbus.services.client.errors import (
    CLIENT_ERRORS,
    ClientError,
    JobFailedError,
    UnavailableError,
    WaitTimeoutError,
)
from modelbus.services.install.defaults import FAILURE_TTL, HASH_JOB_TIMEOUT

SCAN_FUNCTION = "modelbus.workers.scan.run_scan"
SYNC_FUNCTION = "modelbus.workers.scan.run_sync"
QUEUE = "hash"


class WorkerRefusedError(ClientError):
    """What a worker's scan refused, as the leaf of the worker's own error's kind (the client's own errors
    cover the other kinds)."""


class ScanForbiddenError(WorkerRefusedError, Forbidden):
    pass


class ScanConflictError(WorkerRefusedError, Conflict):
    pass


class ScanTooLargeError(WorkerRefusedError, TooLarge):
    pass


REFUSED: dict[Kind, type[ClientError]] = {
    **CLIENT_ERRORS, Kind.FORBIDDEN: ScanForbiddenError, Kind.CONFLICT: ScanConflictError,
    Kind.TOO_LARGE: ScanTooLargeError,
}


def run_on_worker(connection: redis.Redis[bytes], keys: Keys, func: str, args: tuple[Any, ...] = (),
                  timeout: float | None = None) -> dict[str, Any]:
    """Enqueue ``func(*args)`` on the hash queue, wait for it, and return its answer."""
    timeout = defaults.SCAN_TIMEOUT if timeout is None else timeout
    with redis_errors_translated():
        _require_worker(connection, keys, "scans run")
        job = Queue(keys.queue(QUEUE), connection=connection).enqueue(
            func, *args, job_timeout=HASH_JOB_TIMEOUT, result_ttl=defaults.SCAN_RESULT_TTL, failure_ttl=FAILURE_TTL)
        return _answer(job, time.monotonic() + timeout)


def _require_worker(connection: redis.Redis[bytes], keys: Keys, what: str) -> None:
    """No live worker on the queue is 503 at once: a job nobody reads would only time out."""
    if not any(s.serves(QUEUE) for s in routing.worker_states(connection, keys.namespace)):
        raise UnavailableError(f"no live worker serves the {QUEUE} queue, where {what} "
                               f"(start one: modelbus worker --queues {QUEUE})")


def _answer(job: Job, deadline: float, refusals: bool = True) -> dict[str, Any]:
    """The job's answer; ``refusals``: a refusal the worker answered is raised (else returned as it is)."""
    while True:
        status = job.get_status(refresh=True)
        if status == "finished":
            value: dict[str, Any] = job.return_value() or {}
            error = value.get("error")
            if isinstance(error, dict) and refusals:
                kind = Kind(error.get("kind", Kind.FAILED.value))
                message = str(error.get("message") or error.get("type") or "refused")
                raise REFUSED.get(kind, JobFailedError)(message)
            return value
        if status in ("failed", "stopped", "canceled"):
            result = job.latest_result()
            lines = (result.exc_string or "").strip().splitlines()[-1:] if result else []
            raise JobFailedError(lines[0] if lines else f"{job.func_name} {job.id} {status}")
        if time.monotonic() > deadline:
            raise WaitTimeoutError(f"{job.func_name} {job.id} is still {status} on a worker; it goes on")
        time.sleep(defaults.SCAN_POLL_INTERVAL)


VERIFY_FUNCTION = "modelbus.workers.lifecycle.run_verify"
PRUNE_FUNCTION = "modelbus.workers.lifecycle.run_prune"


def run_each_on_worker(connection: redis.Redis[bytes], keys: Keys, func: str, calls: list[tuple[Any, ...]],
                       timeout: float | None = None,
                       on_answer: Callable[[int, dict[str, Any]], None] | None = None,
                       refusals: bool = True) -> list[dict[str, Any]]:
    """``func(*args)`` for each ``args`` of ``calls``, all enqueued at once (the hash workers run them in
    parallel); their answers in order, each told to ``on_answer(index, answer)`` as it comes
    (``refusals=False``: a refusal is an answer ``{"error": ...}``, not raised)."""
    timeout = defaults.SCAN_TIMEOUT if timeout is None else timeout
    with redis_errors_translated():
        _require_worker(connection, keys, "verify and prune run")
        queue = Queue(keys.queue(QUEUE), connection=connection)
        jobs = [queue.enqueue(func, *args, job_timeout=HASH_JOB_TIMEOUT, result_ttl=defaults.SCAN_RESULT_TTL,
                              failure_ttl=FAILURE_TTL) for args in calls]
        deadline = time.monotonic() + timeout
        answers = []
        for index, job in enumerate(jobs):
            answer = _answer(job, deadline, refusals)
            if on_answer is not None:
                on_answer(index, answer)
            answers.append(answer)
        return answers
