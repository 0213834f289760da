"""Starting a worker process on some of modelbus's queues.

``install``, ``download`` and ``hash`` run in RQ's forking Worker (a crash in a job cannot take the
worker down). ``gpu`` runs in a SimpleWorker: jobs run in the worker process itself, so the model cache
lives from job to job and CUDA works (a forked child can do neither). Every worker also listens on its
own queue (``{ns}:gpu:<id>``) so that a load can be routed to the worker already holding the model.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import redis
import structlog
from rq import Queue, SimpleWorker, Worker
from rq.worker import BaseWorker

from events.keys import QUEUES, Keys
from events.workers import WorkerCache, WorkerState, publish_worker_state, remove_worker_state
from workers import defaults

log = structlog.get_logger(__name__)


def worker_name(prefix: str = "mb") -> str:
    return f"{prefix}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def parse_queues(text: str | Sequence[str]) -> list[str]:
    names = [q.strip() for q in (text.split(",") if isinstance(text, str) else text) if q.strip()]
    unknown = [q for q in names if q not in QUEUES]
    if unknown or not names:
        raise ValueError(f"unknown queue(s) {unknown or names}: choose from {', '.join(QUEUES)}")
    return names


class GpuWorker(SimpleWorker):
    """A SimpleWorker (jobs in this process: the cache and CUDA survive) whose running job stays
    alive through our heartbeat thread rather than a TTL as long as the job's timeout: RQ's
    SimpleWorker sends no heartbeat while a job runs, so without this a killed GPU worker's job would
    wait out its whole timeout before another worker took it."""

    def get_heartbeat_ttl(self, job: Any, working_time: float = 0.0) -> int:
        return defaults.GPU_EXECUTION_TTL

    def renew(self) -> None:
        """Extend this worker's and its running job's registrations (called by the heartbeat thread)."""
        execution = getattr(self, "execution", None)
        job = self.get_current_job() if execution is not None else None
        if execution is None or job is None:
            return  # idle: RQ's own loop keeps the worker registered
        pipe = self.connection.pipeline()
        self.heartbeat(defaults.GPU_EXECUTION_TTL, pipeline=pipe)
        execution.heartbeat(job.started_job_registry, defaults.GPU_EXECUTION_TTL, pipe)
        pipe.execute()


class Heartbeat(threading.Thread):
    """Publishes this worker's :class:`WorkerState` (queues, device, cache contents) every few seconds
    with a TTL (``events.workers``)."""

    def __init__(self, connection: Any, keys: Keys, name: str, queues: list[str],
                 state: Callable[[], WorkerCache] | None = None, worker: Any = None) -> None:
        super().__init__(daemon=True, name="modelbus-heartbeat")
        self.connection, self.keys, self.worker_id, self.queues = connection, keys, name, queues
        self.state = state  # what the GPU cache holds, asked at every beat
        self.worker = worker  # a GpuWorker whose running job this thread keeps registered
        self.stopped = threading.Event()

    def describe(self) -> WorkerState:
        cache, error = WorkerCache(), None
        if self.state is not None:
            try:
                cache = self.state()
            except Exception as exc:  # noqa: BLE001 - a probe of worker state must never kill the heartbeat
                error = str(exc)
        return WorkerState(id=self.worker_id, queues=tuple(self.queues), host=socket.gethostname(), pid=os.getpid(),
                           time=time.time(), state_error=error, **dict(cache))

    def beat(self) -> None:
        publish_worker_state(self.connection, self.keys, self.describe(), defaults.WORKER_STATE_TTL)
        if isinstance(self.worker, GpuWorker):
            self.worker.renew()

    def run(self) -> None:
        while not self.stopped.wait(defaults.HEARTBEAT_INTERVAL):
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - Redis may be restarting, and a heartbeat thread that
                # died would make a live worker look dead: it outlives any failure
                log.warning("heartbeat_failed", error=str(exc))

    def stop(self) -> None:
        self.stopped.set()
        try:
            remove_worker_state(self.connection, self.keys, self.worker_id)
        except redis.RedisError as exc:  # the state expires by itself (WORKER_STATE_TTL)
            log.debug("worker_state_not_removed", worker=self.worker_id, error=str(exc))


def build_worker(connection: Any, namespace: str, queue_names: list[str], name: str | None = None) -> BaseWorker:
    keys = Keys(namespace)
    name = name or worker_name()
    names = [keys.queue(q) for q in queue_names]
    if "gpu" in queue_names:
        names.insert(0, keys.worker_queue(name))  # jobs routed to this worker first
    queues = [Queue(n, connection=connection) for n in names]
    cls = GpuWorker if "gpu" in queue_names else Worker
    return cls(queues, name=name, connection=connection, maintenance_interval=defaults.MAINTENANCE_INTERVAL,
               worker_ttl=defaults.WORKER_TTL, job_monitoring_interval=defaults.JOB_MONITORING_INTERVAL)
