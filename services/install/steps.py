"""What every install step (RQ job) shares: ending a job, the cancel flag, and deciding whether an
error is the job's end or worth another try.

The error's kind decides (``events.errors``): a modelbus error that is not unavailable or timed out
(bad input, a 404, a corrupt file, a duplicate, a failed download) ends the job at once: retrying
cannot change the answer. Unavailable and timed out errors, and anything unexpected, are raised again
for RQ to retry while retries are left (a Redis blip, a full disk freed meanwhile); the last attempt
records the failure instead, so no job is left waiting forever.
"""

from __future__ import annotations

import threading
from types import TracebackType

import redis

from modelbus.events.errors import Kind, kind_of
from modelbus.events.keys import Keys
from modelbus.events.logs import get_logger
from modelbus.events.schema import InstallFailed
from modelbus.events.store import EventStore
from modelbus.services.download.cancel import Cancellation
from modelbus.services.install.defaults import CANCEL_FLAG_TTL, CANCEL_POLL_INTERVAL
from modelbus.services.install.jobs import InstallJob, transition, unless_ended

log = get_logger(__name__)

#: kinds worth another attempt; every other modelbus error is the answer, not an accident
RETRIED_KINDS = frozenset({Kind.UNAVAILABLE, Kind.TIMED_OUT})


def error_name(exc: BaseException) -> str:
    return type(exc).__name__


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return text or error_name(exc)


def fail_job(store: EventStore, job_id: str, error_type: str, message: str) -> InstallJob:
    """Move the job to ``error`` (unless it already ended) and tell its other steps to stop."""
    job, appended = transition(store, job_id, unless_ended(
        lambda j: InstallFailed(aggregate_id=job_id, error_type=error_type, error=message, correlation_id=job_id)))
    if appended:
        log.warning("install_failed", job=job_id, error_type=error_type, error=message)
    return job


def set_cancel_flag(client: redis.Redis, keys: Keys, job_id: str) -> None:
    client.set(keys.cancel_flag(job_id), b"1", ex=CANCEL_FLAG_TTL)


def cancel_flag_set(client: redis.Redis, keys: Keys, job_id: str) -> bool:
    return bool(client.exists(keys.cancel_flag(job_id)))


def is_final(exc: BaseException, retries_left: int | None) -> bool:
    """Whether this error ends the job now (bad input, or no retry left)."""
    kind = kind_of(exc)
    return (kind is not None and kind not in RETRIED_KINDS) or not retries_left


class CancelWatcher:
    """Polls the job's cancel flag while a step runs and stops ``cancellation`` when it is set, which
    wakes a download blocked in a socket read at once (see services.download.cancel)."""

    def __init__(self, client: redis.Redis, keys: Keys, job_id: str, cancellation: Cancellation,
                 interval: float = CANCEL_POLL_INTERVAL, pause_id: str | None = None) -> None:
        """``pause_id``: also stop (reason ``pause``) when this attempt's pause flag is set."""
        self.client, self.keys, self.job_id = client, keys, job_id
        self.pause_id = pause_id
        self.cancellation = cancellation
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"cancel-watch-{job_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self._check():
                    return
            except redis.RedisError as exc:  # keep watching: Redis may be restarting
                log.warning("cancel_watch_failed", job=self.job_id, error=str(exc))

    def _check(self) -> bool:
        if cancel_flag_set(self.client, self.keys, self.job_id):
            self.cancellation.stop("cancel")
            return True
        if self.pause_id is not None and self.client.exists(self.keys.pause_flag(self.pause_id)):
            self.cancellation.stop("pause")
            return True
        return False

    def __enter__(self) -> CancelWatcher:  # noqa: PYI034
        self._check()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
