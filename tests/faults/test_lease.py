"""The job lease and its fencing token against a real Redis (workers.lease), and the lock of a partial
file (services.download.partial): a run that was given up for dead cannot write once another run took
its job over, a holder rides out a Redis outage, and two writers never share one partial file."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import redis

from modelbus.events.keys import Keys
from modelbus.services.download.errors import PartialBusyError
from modelbus.services.download.partial import lock_partial
from modelbus.workers.errors import LeaseLostError
from modelbus.workers.lease import Lease
from tests.faults.redis_proc import PrivateRedis
from tests.waiting import wait_until


def _lease(client: redis.Redis, namespace: str, holder: str, ttl: float = 8.0) -> Lease:
    return Lease(client, Keys(namespace), "job-1-dl0", holder, ttl=ttl)


def test_a_rerun_waits_for_a_live_holder_and_then_takes_over(redis_url: str, namespace: str) -> None:
    client = redis.Redis.from_url(redis_url)
    first = _lease(client, namespace, "first", ttl=2.0)
    assert first.acquire() == 1
    first.start()  # renewed: it never lapses while the holder lives
    second = _lease(client, namespace, "second", ttl=2.0)
    tokens: list[int] = []
    waiter = threading.Thread(target=lambda: tokens.append(second.acquire()))
    waiter.start()
    time.sleep(3 * 2.0)  # three TTLs: a lease that was not renewed would have lapsed
    assert waiter.is_alive() and not tokens, "the re-run took the lease of a live holder"
    first.release()
    waiter.join(timeout=10)
    assert tokens == [2]
    second.release()


def test_a_run_given_up_for_dead_is_fenced_off(redis_url: str, namespace: str) -> None:
    """The holder stops renewing (frozen), its lease lapses, another run takes it over (token 2): the old
    holder's next fence raises instead of letting it write."""
    client = redis.Redis.from_url(redis_url)
    stale = _lease(client, namespace, "stale", ttl=1.0)
    assert stale.acquire() == 1
    stale.fence()  # fresh: a clock read, no Redis call
    rescuer = _lease(client, namespace, "rescuer", ttl=1.0)
    assert rescuer.acquire() == 2  # waited for the lapse, then took it over
    with pytest.raises(LeaseLostError, match="token 1"):
        stale.fence()
    assert stale.lost
    rescuer.fence()
    stale.release()  # a lost lease is not the stale run's to give back
    assert client.hget(Keys(namespace).lease("job-1-dl0"), "holder") == b"rescuer"
    rescuer.release()


def test_a_holder_rides_out_a_redis_outage_longer_than_its_lease(tmp_path: Path, namespace: str) -> None:
    """Redis SIGKILLed and restarted (AOF) for longer than the TTL while a run holds the lease: its
    writes wait (fence blocks) and go on once Redis is back, under the same token, as nobody took over."""
    import signal
    server = PrivateRedis(tmp_path / "redis").start()
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1)
        lease = _lease(client, namespace, "holder", ttl=1.0)
        assert lease.acquire() == 1
        lease.start()
        killed = time.monotonic()
        server.stop(signal.SIGKILL)
        passed: list[float] = []
        writer = threading.Thread(target=lambda: (lease.fence(), passed.append(time.monotonic())))
        time.sleep(1.5)  # the trusted part of the lease is over: the writer must wait for Redis
        writer.start()
        time.sleep(2.0)
        assert not passed, "a write went ahead while the lease could not be confirmed"
        server.start()
        back = time.monotonic()
        writer.join(timeout=30)
        assert passed and passed[0] >= back and not lease.lost
        print(f"\n[lease] writes waited out a {back - killed:.1f} s Redis outage; resumed "
              f"{passed[0] - back:.2f} s after Redis came back, token still {lease.token}")
        lease.release()
    finally:
        server.stop()


def test_two_writers_never_share_a_partial_file(tmp_path: Path) -> None:
    part = tmp_path / "model.safetensors.part"
    first = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    second = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert lock_partial(first, part, 1.0, lambda: None)
        with pytest.raises(PartialBusyError, match="being written by another download"):
            lock_partial(second, part, 0.5, lambda: None)
        os.close(first)
        first = -1
        assert lock_partial(second, part, 1.0, lambda: None)  # the first writer is gone: the lock is free
    finally:
        for fd in (first, second):
            if fd >= 0:
                os.close(fd)


def test_a_partial_file_replaced_while_waiting_is_not_trusted(tmp_path: Path) -> None:
    part = tmp_path / "model.safetensors.part"
    holder = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    waiter = os.open(part, os.O_RDWR)
    assert lock_partial(holder, part, 1.0, lambda: None)
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(lock_partial(waiter, part, 10.0, lambda: None)))
    thread.start()
    time.sleep(0.3)
    os.replace(part, tmp_path / "model.safetensors")  # the holder finished: renamed into place
    os.close(holder)
    thread.join(timeout=10)
    os.close(waiter)
    wait_until(lambda: result, 5, "the waiter to return")
    assert result == [False]


def test_a_job_that_ended_is_not_run_again_by_a_later_delivery(redis_url: str, namespace: str) -> None:
    client = redis.Redis.from_url(redis_url)
    first = _lease(client, namespace, "first")
    first.acquire()
    failed = _lease(client, namespace, "failed")
    first.release()  # ended by an error (RQ retries it): the next run does the work
    failed.acquire()
    assert not failed.done_before and failed.token == 2
    failed.release(done=True)
    again = _lease(client, namespace, "again")
    again.acquire()
    assert again.done_before, "a job that ended normally was handed to a later delivery to run again"


def test_the_maintenance_lock_of_a_worker_that_dies_holding_it_lapses_soon(redis_url: str, namespace: str) -> None:
    """RQ takes it for 899 s: a worker killed inside its maintenance pass stopped every worker's pass
    (and so the hand-on of dead workers' jobs) for a quarter hour. Ours lapses in MAINTENANCE_LOCK_TTL."""
    from rq import Queue

    from modelbus.workers import defaults
    from modelbus.workers.runner import _maintenance_lock

    queue = Queue(Keys(namespace).queue("download"), connection=redis.Redis.from_url(redis_url))
    assert _maintenance_lock(queue) and not _maintenance_lock(queue)  # exclusive, with RQ's own pass too
    assert 0 < queue.connection.ttl(queue.registry_cleaning_key) <= defaults.MAINTENANCE_LOCK_TTL
    assert not queue.acquire_maintenance_lock()  # the same key as RQ's lock
    queue.release_maintenance_lock()
