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
from collections.abc import Callable, Sequence
from typing import Any

import redis
from rq import Queue, SimpleWorker, Worker, worker_registration
from rq.registry import StartedJobRegistry, clean_registries
from rq.timeouts import TimerDeathPenalty
from rq.utils import now as utcnow
from rq.worker import BaseWorker

from modelbus.events.keys import QUEUES, Keys
from modelbus.events.logs import get_logger
from modelbus.events.workers import WorkerCache, WorkerState, publish_worker_state, remove_worker_state
from modelbus.services.process import die_with_parent
from modelbus.workers import defaults
from modelbus.workers.errors import LeaseLostError

log = get_logger(__name__)


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
    connection: Any
    pubsub: Any
    pubsub_channel_name: str
    pubsub_thread: Any
    last_cleaned_at: Any  # (RQ's BaseWorker sets it: None, then a datetime)

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

    def clean_registries(self) -> None:
        """RQ's maintenance pass, under RQ's lock taken for ``MAINTENANCE_LOCK_TTL`` s instead of RQ's 899:
        a worker killed while it held the lock must not stop every worker's pass for a quarter hour."""
        for queue in self.queues:  # type: ignore[attr-defined]
            if not _maintenance_lock(queue):
                continue
            try:
                clean_registries(queue, self._exc_handlers)  # type: ignore[attr-defined]
                worker_registration.clean_worker_registry(queue)
                queue.intermediate_queue.cleanup(self, queue)
            finally:
                queue.release_maintenance_lock()
        self.last_cleaned_at = utcnow()

    def subscribe(self) -> None:
        """RQ's, but the thread that takes RQ's commands (kill-horse, shutdown) polls every
        ``PUBSUB_POLL`` s instead of 60: redis-py 8.2's ``PubSubWorkerThread.stop()`` joins that thread,
        which after the unsubscribe waits out a whole poll for a subscription, so a stopping worker (a
        burst worker's exit, a warm shutdown) hung for up to a minute after 'done, quitting'."""
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})  # type: ignore[attr-defined]
        self.pubsub_thread = self.pubsub.run_in_thread(sleep_time=defaults.PUBSUB_POLL, daemon=True,
                                                       exception_handler=self._pubsub_exception_handler)  # type: ignore[attr-defined]

    # what this worker last wrote of its RQ key on its own (not in a pipeline): (TTL, when) of the
    # heartbeat, and the state; forgotten while a job runs, whose run writes that key too
    _beat_sent: tuple[int, float] | None = None
    _state_sent: str | None = None
    worker_ttl: int

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ's, in one round trip (RQ sends its three commands one by one when it is given no pipeline),
        and not sent again within ``HEARTBEAT_COALESCE`` s with the same TTL: RQ's loop beats four times
        around every job, within a few milliseconds, and a fleet's workers all pay Redis for each."""
        if pipeline is not None:
            super().heartbeat(timeout, pipeline=pipeline)  # type: ignore[misc]
            return
        ttl = timeout or self.worker_ttl + 60  # (RQ's default)
        sent = self._beat_sent
        if sent is not None and sent[0] == ttl and time.monotonic() - sent[1] < defaults.HEARTBEAT_COALESCE:
            return
        with self.connection.pipeline(transaction=False) as pipe:
            super().heartbeat(timeout, pipeline=pipe)  # type: ignore[misc]
            pipe.execute()
        self._beat_sent = (ttl, time.monotonic())

    def set_state(self, state: str, pipeline: Any = None) -> None:
        """RQ's, but the state this worker wrote last is not written again (RQ's loop writes ``idle`` twice
        after every job)."""
        if pipeline is None and state == self._state_sent:
            return
        super().set_state(state, pipeline=pipeline)  # type: ignore[misc]
        self._state_sent = state if pipeline is None else None

    def execute_job(self, job: Any, queue: Any) -> None:
        self._beat_sent = self._state_sent = None  # the job's run writes this worker's key (its TTL, its state)
        try:
            super().execute_job(job, queue)  # type: ignore[misc]
        finally:
            self._beat_sent = None  # (the state it ends with, idle, is written by this process)

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
    """Publishes this worker's :class:`WorkerState` (queues, device, cache contents) every few seconds
    with a TTL (``events.workers``)."""

    def __init__(self, connection: Any, keys: Keys, name: str, queues: list[str],
                 state: Callable[[], WorkerCache] | None = None, worker: Any = None) -> None:
        super().__init__(daemon=True, name="modelbus-heartbeat")
        self.connection, self.keys, self.worker_id, self.queues = connection, keys, name, queues
        self.state = state  # what the GPU cache holds, asked at every beat
        self.worker = worker  # a GpuWorker whose running job this thread keeps registered
        self.stopped = threading.Event()
        self._next_rescue = 0.0

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
            remove_worker_state(self.connection, self.keys, self.worker_id)
            if "gpu" in self.queues:
                drop_worker_queue(self.connection, self.keys, self.worker_id)
        except redis.RedisError as exc:  # the state expires by itself (WORKER_STATE_TTL)
            log.debug("worker_state_not_removed", worker=self.worker_id, error=str(exc))


# the order a worker takes jobs from its queues: the later step of a started install before the first
# step of a new one, so that installs end in the order they came (each as soon as its own work is done,
# not after every queued copy) and no staging folder waits while new ones fill up
LISTEN_ORDER = ("hash", "download", "install", "gpu")


def build_worker(connection: Any, namespace: str, queue_names: list[str], name: str | None = None) -> BaseWorker:
    keys = Keys(namespace)
    name = name or worker_name()
    names = [keys.queue(q) for q in sorted(queue_names, key=LISTEN_ORDER.index)]
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
        if not _maintenance_lock(queue):
            continue
        try:
            # a timer, not SIGALRM, bounds the failure callback: this runs in the heartbeat thread
            StartedJobRegistry(queue=queue, death_penalty_class=TimerDeathPenalty).cleanup()
        finally:
            queue.release_maintenance_lock()


def _maintenance_lock(queue: Queue) -> bool:
    """RQ's maintenance lock of ``queue`` (the same key, so RQ's own pass and ours exclude each other)."""
    return bool(queue.connection.set(queue.registry_cleaning_key, 1, nx=True, ex=defaults.MAINTENANCE_LOCK_TTL))


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
    """Remove the own queues of GPU workers that are gone: their published state (renewed every
    ``HEARTBEAT_INTERVAL`` s by a live worker) has lapsed. Jobs routed to one go to the shared gpu queue."""
    prefix = f"{Queue.redis_queue_namespace_prefix}{keys.worker_queue('')}"
    for raw in connection.smembers(Queue.redis_queues_keys):
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        if not name.startswith(prefix):
            continue
        worker_id = name[len(prefix):]
        if connection.exists(keys.worker_state(worker_id)):
            continue
        moved = drop_worker_queue(connection, keys, worker_id)
        log.info("gone_worker_queue_dropped", worker=worker_id, jobs_moved=moved)
