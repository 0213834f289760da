"""Starting a worker process on some of modelbus's queues.

``install``, ``download`` and ``hash`` run in RQ's forking Worker (a crash in a job cannot take the
worker down). ``gpu`` runs in a SimpleWorker: jobs run in the worker process itself, so the model cache
lives from job to job and CUDA works (a forked child can do neither). Every worker also listens on its
own queue (``{ns}:gpu:<id>``) so that a load can be routed to the worker already holding the model.

A forking worker's job process (RQ's work-horse) dies with its worker (parent-death signal): a killed
worker leaves no run of its job behind to race the re-run. A running job is renewed every
``JOB_MONITORING_INTERVAL`` s and given up ``JOB_HEARTBEAT_SLACK`` s after its renewals stop; every
worker's heartbeat thread (idle or busy) then hands it to the next worker within
``MAINTENANCE_INTERVAL`` s. A run that lost its job's lease (workers.lease) records nothing in RQ: the
job belongs to the run that took the lease over.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import orjson
import redis
import structlog
from rq import Queue, SimpleWorker, Worker
from rq.registry import StartedJobRegistry
from rq.timeouts import TimerDeathPenalty
from rq.worker import BaseWorker

from events.keys import QUEUES, Keys
from workers import defaults
from workers.errors import LeaseLostError
from workers.process import die_with_parent

log = structlog.get_logger(__name__)


def worker_name(prefix: str = "mb") -> str:
    return f"{prefix}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def parse_queues(text: str | Sequence[str]) -> list[str]:
    names = [q.strip() for q in (text.split(",") if isinstance(text, str) else text) if q.strip()]
    unknown = [q for q in names if q not in QUEUES]
    if unknown or not names:
        raise ValueError(f"unknown queue(s) {unknown or names}: choose from {', '.join(QUEUES)}")
    return names


class _Fenced:
    """What our workers share: a run that lost its lease leaves the job's RQ state to the new holder,
    and a Redis outage while a job runs does not end the worker that watches it."""

    log: Any
    name: str

    def _finalize_failure(self, job: Any, queue: Any, execution: Any, exc_info: Any) -> None:
        if isinstance(exc_info[1], LeaseLostError):
            self.log.warning("Worker %s: job %s lost its lease; its new run records the outcome", self.name, job.id)
            return
        super()._finalize_failure(job, queue, execution, exc_info)  # type: ignore[misc]

    def handle_job_failure(self, job: Any, queue: Any, started_job_registry: Any = None, exc_string: str = "",
                           execution: Any = None) -> None:
        """RQ's, unless this run of the job was given up for dead (its execution is no longer in the started
        registry): the job was handed to another worker, whose run records the outcome."""
        if execution is not None and self.connection.zscore(job.started_job_registry.key,
                                                            execution.composite_key) is None:
            self.log.warning("Worker %s: job %s was handed on while this run of it ended; recording nothing",
                             self.name, job.id)
            return
        super().handle_job_failure(job, queue, started_job_registry=started_job_registry,  # type: ignore[misc]
                                   exc_string=exc_string, execution=execution)

    def maintain_heartbeats(self, job: Any, execution: Any) -> None:
        try:
            super().maintain_heartbeats(job, execution)  # type: ignore[misc]
        except redis.RedisError as exc:  # the job keeps running; RQ hands it on if the outage outlasts it
            log.warning("job_heartbeat_failed", worker=self.name, job=job.id, error=str(exc))


class ForkingWorker(_Fenced, Worker):
    """RQ's Worker, whose work-horse gets SIGKILL when the worker dies and whose running job is given
    up seconds (not a minute) after the worker stopped renewing it."""

    def fork_work_horse(self, job: Any, queue: Any) -> None:
        parent = os.getpid()
        child_pid = os.fork()
        os.environ["RQ_WORKER_ID"] = self.name
        os.environ["RQ_JOB_ID"] = job.id
        if child_pid == 0:  # RQ's own fork_work_horse (rq 3.0), with the parent-death signal added
            os.setpgrp()
            die_with_parent(signal.SIGKILL, parent)
            self.main_work_horse(job, queue)
            os._exit(0)
        self._horse_pid = child_pid
        self.procline(f"Forked {child_pid} at {time.time()}")

    def get_heartbeat_ttl(self, job: Any, working_time: float = 0.0) -> int:
        interval = self.job_monitoring_interval
        if job.timeout and job.timeout > 0:
            interval = int(min(job.timeout - working_time, interval))
        return max(1, interval) + defaults.JOB_HEARTBEAT_SLACK


class GpuWorker(_Fenced, SimpleWorker):
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
    """Publishes this worker's state (queues, device, cache contents) every few seconds with a TTL."""

    def __init__(self, connection: Any, keys: Keys, name: str, queues: list[str],
                 state: Any = None, worker: Any = None) -> None:
        super().__init__(daemon=True, name="modelbus-heartbeat")
        self.connection, self.keys, self.worker_id, self.queues = connection, keys, name, queues
        self.state = state  # a callable returning extra fields (the GPU cache's contents)
        self.worker = worker  # a GpuWorker whose running job this thread keeps registered
        self.stopped = threading.Event()
        self._next_rescue = 0.0

    def beat(self) -> None:
        info: dict[str, Any] = {"id": self.worker_id, "queues": self.queues, "host": socket.gethostname(),
                                "pid": os.getpid(), "time": time.time()}
        if self.state is not None:
            try:
                info.update(self.state())
            except Exception as exc:  # noqa: BLE001 - a probe of worker state must never kill the heartbeat
                info["state_error"] = str(exc)
        pipe = self.connection.pipeline()
        pipe.set(self.keys.worker_state(self.worker_id), orjson.dumps(info), ex=defaults.WORKER_STATE_TTL)
        pipe.zadd(self.keys.workers, {self.worker_id: info["time"]})
        pipe.execute()
        if isinstance(self.worker, GpuWorker):
            self.worker.renew()
        if self.worker is not None and time.monotonic() >= self._next_rescue:
            self._next_rescue = time.monotonic() + defaults.MAINTENANCE_INTERVAL
            rescue_abandoned(self.worker)
            drop_gone_worker_queues(self.connection, self.keys)

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
            self.connection.delete(self.keys.worker_state(self.worker_id))
            self.connection.zrem(self.keys.workers, self.worker_id)
            if "gpu" in self.queues:
                drop_worker_queue(self.connection, self.keys, self.worker_id)
        except redis.RedisError as exc:  # the state expires by itself (WORKER_STATE_TTL)
            log.debug("worker_state_not_removed", worker=self.worker_id, error=str(exc))


def build_worker(connection: Any, namespace: str, queue_names: list[str], name: str | None = None) -> BaseWorker:
    keys = Keys(namespace)
    name = name or worker_name()
    names = [keys.queue(q) for q in queue_names]
    if "gpu" in queue_names:
        names.insert(0, keys.worker_queue(name))  # jobs routed to this worker first
    queues = [Queue(n, connection=connection) for n in names]
    cls = GpuWorker if "gpu" in queue_names else ForkingWorker
    return cls(queues, name=name, connection=connection, maintenance_interval=defaults.MAINTENANCE_INTERVAL,
               worker_ttl=defaults.WORKER_TTL, job_monitoring_interval=defaults.JOB_MONITORING_INTERVAL)


def rescue_abandoned(worker: BaseWorker) -> None:
    """Hand on the jobs of this worker's queues whose worker stopped renewing them (RQ's own maintenance
    pass for the started registries, under RQ's maintenance lock, run from the heartbeat thread so that
    a busy worker does it too)."""
    for queue in worker.queues:
        if not queue.acquire_maintenance_lock():
            continue
        try:
            # a timer, not SIGALRM, bounds the failure callback: this runs in the heartbeat thread
            StartedJobRegistry(queue=queue, death_penalty_class=TimerDeathPenalty).cleanup()
        finally:
            queue.release_maintenance_lock()


def drop_worker_queue(connection: Any, keys: Keys, worker_id: str) -> int:
    """Remove a GPU worker's own queue; jobs still routed to it go to the shared gpu queue. The count moved."""
    own = Queue(keys.worker_queue(worker_id), connection=connection)
    shared = Queue(keys.queue("gpu"), connection=connection)
    moved = 0
    for job_id in own.get_job_ids():
        job = own.fetch_job(job_id)
        own.remove(job_id)
        if job is not None:
            job.origin = shared.name
            job.save()
            shared.push_job_id(job_id)
            moved += 1
    own.delete(delete_jobs=False)
    return moved


def drop_gone_worker_queues(connection: Any, keys: Keys) -> None:
    """Remove the own queues of GPU workers that are gone (no published state, no RQ registration)."""
    prefix = f"{Queue.redis_queue_namespace_prefix}{keys.worker_queue('')}"
    for raw in connection.smembers(Queue.redis_queues_keys):
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        if not name.startswith(prefix):
            continue
        worker_id = name[len(prefix):]
        if connection.exists(keys.worker_state(worker_id), f"{Worker.redis_worker_namespace_prefix}{worker_id}"):
            continue
        moved = drop_worker_queue(connection, keys, worker_id)
        log.info("gone_worker_queue_dropped", worker=worker_id, jobs_moved=moved)
