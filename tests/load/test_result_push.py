"""Waiting for a GPU job reads RQ's result stream, which the worker writes when the job ends: the
result is pushed to the waiting caller instead of the job's status being polled every few milliseconds.
Real RQ workers (their own processes, burst mode) on the test's Redis."""

from __future__ import annotations

import subprocess
import sys

import pytest
import redis
from rq import Queue

from modelbus.services import routing
from modelbus.services.config import AppConfig


def _counted(connection: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Commands this connection sends from now on (the server's own counters also count every other
    client of the shared test Redis)."""
    sent = [0]
    send = connection.execute_command

    def counting(*args: object, **options: object) -> object:
        sent[0] += 1
        return send(*args, **options)

    monkeypatch.setattr(connection, "execute_command", counting)
    return sent


def _run_burst_worker(app_config: AppConfig, queue: Queue) -> None:
    subprocess.run([sys.executable, "-m", "rq.cli", "worker", "--burst", "--url", str(app_config.redis_url),
                    queue.name], check=True, capture_output=True, timeout=120)


@pytest.fixture()
def queue(app_config: AppConfig) -> Queue:
    connection = redis.Redis.from_url(str(app_config.redis_url))
    return Queue(f"{app_config.namespace}:test-results", connection=connection)


def test_a_finished_job_returns_its_value(app_config: AppConfig, queue: Queue) -> None:
    job = queue.enqueue("os.path.join", "a", "b")
    _run_burst_worker(app_config, queue)
    assert routing.wait_result(job, timeout=30) == "a/b"


def test_a_failed_job_raises_the_workers_error(app_config: AppConfig, queue: Queue) -> None:
    job = queue.enqueue("os.path.getsize", "/no/such/file/anywhere")
    _run_burst_worker(app_config, queue)
    with pytest.raises(routing.GpuJobFailedError, match="FileNotFoundError"):
        routing.wait_result(job, timeout=30)


def test_a_cancelled_job_ends_the_wait(queue: Queue) -> None:
    job = queue.enqueue("os.getcwd")
    job.cancel()
    with pytest.raises(routing.GpuJobFailedError, match="canceled"):
        routing.wait_result(job, timeout=30)


def test_waiting_blocks_on_redis_instead_of_polling(queue: Queue, monkeypatch: pytest.MonkeyPatch) -> None:
    # nobody serves the queue: the wait times out; a poll every 20 ms sent about a hundred commands
    # in those two seconds, a blocking read of the result stream a handful
    job = queue.enqueue("os.getcwd")
    sent = _counted(queue.connection, monkeypatch)
    with pytest.raises(routing.GpuJobTimeoutError):
        routing.wait_result(job, timeout=2)
    assert 0 < sent[0] <= 10
