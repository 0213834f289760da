"""A running job's lease, with a fencing token: at most one run of an RQ job writes at a time.

RQ hands a job to another worker when the worker running it stops renewing it (killed, frozen, cut off
from Redis). The old run may still be alive, so every run of a job first takes the job's lease:

- ``{ns}:lease:<rq job id>`` holds ``holder``, ``expires`` (Redis server time, ms) and ``token``, a
  counter raised by every take-over and never reset (the fencing token).
- A run takes the lease when it is free or lapsed, and waits while a live holder renews it. A run that
  ended normally marks the lease ``done``: a later delivery of the same RQ job (RQ gave it up for dead
  while it was alive, a requeue after a lost acknowledgement) finds it done and does nothing again.
- The holder renews it every ``LEASE_RENEW_EVERY`` s from a thread. A renewal succeeds while the token is
  still its own, even after a Redis outage let the expiry pass, because nobody else took it over.
- Before each write the holder calls :meth:`Lease.fence`: inside the part of the TTL it may trust
  (``LEASE_SAFETY``) it costs a clock read; past it (the process was frozen, Redis was away) it renews
  synchronously first, waits out an outage, and raises :class:`LeaseLostError` if the token moved on,
  so a run that wakes up after it was given up for dead stops without writing.

This is the lease-plus-fencing-token scheme of Chubby and of Kubernetes' leader election (a lease with
a holder and a renew deadline; ``leaseTransitions`` plays the token's part).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from rq import get_current_job

from modelbus.events.keys import Keys
from modelbus.events.logs import get_logger
from modelbus.workers import defaults
from modelbus.workers.errors import LeaseLostError

log = get_logger(__name__)

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 'holder', 'expires', 'token', 'done')
if h[4] == '1' then
  return {2, tonumber(h[3] or '0'), 0, ''}
end
if h[1] and h[1] ~= ARGV[1] and tonumber(h[2] or '0') > now then
  return {0, tonumber(h[3] or '0'), tonumber(h[2]) - now, h[1]}
end
local token = redis.call('HINCRBY', KEYS[1], 'token', 1)
redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'expires', now + tonumber(ARGV[2]))
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, token, 0, ARGV[1]}
"""

_RENEW = """
local h = redis.call('HMGET', KEYS[1], 'holder', 'token')
if h[1] ~= ARGV[1] or h[2] ~= ARGV[2] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'expires', now + tonumber(ARGV[3]))
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

_RELEASE = """
local h = redis.call('HMGET', KEYS[1], 'holder', 'token')
if h[1] ~= ARGV[1] or h[2] ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], 'holder', 'expires')
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'done', '1') end
return 1
"""


class Lease:
    """One run's hold on one RQ job. Use :func:`held` rather than building one."""

    def __init__(self, client: redis.Redis, keys: Keys, job_id: str, holder: str,
                 ttl: float = defaults.LEASE_TTL) -> None:
        self.client, self.key, self.job_id, self.holder, self.ttl = client, keys.lease(job_id), job_id, holder, ttl
        self.renew_every = min(defaults.LEASE_RENEW_EVERY, ttl / 4)
        self.token = 0
        self.lost = False
        self.done_before = False
        self._valid_until = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_lost: list[Callable[[], None]] = []
        self._scripts = {name: client.register_script(text)
                         for name, text in (("acquire", _ACQUIRE), ("renew", _RENEW), ("release", _RELEASE))}

    # -- taking and giving back ---------------------------------------------------------------
    def acquire(self) -> int:
        """Take the lease, waiting while a live holder renews it and while Redis is away; the token."""
        waited_for = None
        backoff = _Backoff()
        while True:
            sent = time.monotonic()
            try:
                ok, token, left_ms, other = self._scripts["acquire"](
                    keys=[self.key], args=[self.holder, int(self.ttl * 1000), defaults.LEASE_KEEP])
            except redis.RedisError as exc:
                backoff.wait("lease_acquire_waits_for_redis", job=self.job_id, error=str(exc))
                continue
            if ok == 2:
                self.token, self.done_before = int(token), True
                log.info("lease_found_done", job=self.job_id, token=self.token)
                return self.token
            if ok:
                self.token, self._valid_until = int(token), sent + self.ttl * defaults.LEASE_SAFETY
                log.info("lease_acquired", job=self.job_id, token=self.token, holder=self.holder,
                         took_over=self.token > 1)
                return self.token
            if waited_for != other:
                waited_for = other
                log.info("lease_held_elsewhere", job=self.job_id, holder=_text(other), token=int(token))
            time.sleep(min(defaults.LEASE_POLL, max(0.05, int(left_ms) / 1000)))

    def release(self, done: bool = False) -> None:
        """Give the lease back; ``done``: the run ended normally, later deliveries have nothing to do."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost or self.done_before:
            return
        try:
            self._scripts["release"](keys=[self.key], args=[self.holder, self.token, int(done)])
        except redis.RedisError as exc:  # it lapses by itself within the TTL
            log.warning("lease_not_released", job=self.job_id, error=str(exc))

    # -- keeping it -----------------------------------------------------------------------------
    def renew(self) -> bool:
        """One renewal: True while the lease is ours; raises redis errors (the caller decides)."""
        sent = time.monotonic()
        ok = self._scripts["renew"](keys=[self.key], args=[self.holder, self.token, int(self.ttl * 1000),
                                                           defaults.LEASE_KEEP])
        with self._lock:
            if ok:
                self._valid_until = max(self._valid_until, sent + self.ttl * defaults.LEASE_SAFETY)
            elif not self.lost:
                self.lost = True
                log.warning("lease_lost", job=self.job_id, token=self.token, holder=self.holder)
                for callback in self._on_lost:
                    callback()
        return bool(ok)

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (once, from the renewing thread) when the lease turns out to be lost: to wake a
        writer blocked in a read, so that it reaches its next fence at once."""
        self._on_lost.append(callback)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._keep, name=f"lease-{self.job_id}", daemon=True)
        self._thread.start()

    def _keep(self) -> None:
        while not self._stop.wait(self.renew_every) and not self.lost:
            try:
                self.renew()
            except redis.RedisError as exc:  # fence() stops the writes once the trusted time has passed
                log.warning("lease_renewal_failed", job=self.job_id, error=str(exc))

    def fence(self) -> None:
        """Call before every write: returns while the lease is surely ours, raises LeaseLostError if it is
        not, and blocks (renewing) while that cannot be known (Redis away, or this process was frozen)."""
        backoff = _Backoff()
        while True:
            if self.lost:
                raise LeaseLostError(f"job {self.job_id}: its lease (token {self.token}) was taken over by "
                                     "another run; this run stops without writing")
            if time.monotonic() < self._valid_until:
                return
            try:
                self.renew()
            except redis.RedisError as exc:
                backoff.wait("lease_fence_waits_for_redis", job=self.job_id, error=str(exc))


class _Backoff:
    """Doubling waits for as long as Redis stays away, one log line per wait."""

    def __init__(self) -> None:
        self.delay = defaults.REDIS_BACKOFF_START

    def wait(self, event: str, **fields: Any) -> None:
        log.warning(event, retry_in=self.delay, **fields)
        time.sleep(self.delay)
        self.delay = min(defaults.REDIS_BACKOFF_MAX, self.delay * 2)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_current: Lease | None = None


@contextmanager
def held(client: redis.Redis, keys: Keys, job_id: str | None, holder: str) -> Iterator[Lease | None]:
    """Hold the lease of RQ job ``job_id`` for the block (None outside a worker: no lease, no fence).
    When the yielded lease is ``done_before``, an earlier run of the job ended normally: skip the work."""
    global _current
    if job_id is None:
        yield None
        return
    lease = Lease(client, keys, job_id, holder)
    lease.acquire()
    if lease.done_before:
        yield lease
        return
    lease.start()
    _current = lease
    done = False
    try:
        yield lease
        done = True
    finally:
        _current = None
        lease.release(done=done)


def current() -> Lease | None:
    """The lease the running job holds (None outside a worker job)."""
    return _current


@contextmanager
def for_current_job(client: redis.Redis, keys: Keys, worker_id: str) -> Iterator[Lease | None]:
    """Hold the lease of the RQ job this process runs, if any."""
    job = get_current_job()
    with held(client, keys, job.id if job is not None else None, f"{worker_id}:{os.getpid()}") as lease:
        yield lease
