"""Routing GPU work: a load goes to the worker that already holds the model, else to one whose host
cache has its files on disk, else to the one with the most free VRAM, else to the shared ``gpu`` queue.
A model whose format wants a device (bitsandbytes checkpoints: CUDA, :func:`device_wanted`) chooses among
the workers on that device first, and among all of them only when none is alive.
Worker states are what each GPU worker's heartbeat publishes (``events.workers.WorkerState``): its queues,
device, cached models, models on disk and free VRAM.

Jobs are enqueued by import path (``workers.gpu.*``): services never import the worker package.
Redis and RQ errors are translated here (``StoreUnavailableError``), so callers see modelbus errors only.

    RoutingError
    ├── NoSuchWorkerError     (NotFound) the named GPU worker is not alive
    ├── GpuJobTimeoutError    (TimedOut) the job did not finish in time (it may still run)
    ├── GpuJobFailedError     (Failed) the worker ran the job and it failed (the message is the worker's)
    └── WorkerStoppedError    (Failed) the worker(s) the job was sent to stopped before it finished
"""

from __future__ import annotations

import time
from typing import Any

import redis
from rq import Queue
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.results import Result

from modelbus.events.connection import redis_errors_translated
from modelbus.events.errors import Failed, ModelbusError, NotFound, TimedOut
from modelbus.events.keys import Keys
from modelbus.events.logs import get_logger
from modelbus.events.workers import WorkerState, read_worker_states, worker_alive
from modelbus.services.records.enums import ModelFormat

LOAD_JOB = "modelbus.workers.gpu.load_job"
UNLOAD_JOB = "modelbus.workers.gpu.unload_job"
STATS_JOB = "modelbus.workers.gpu.stats_job"
GPU_JOB_TIMEOUT = 1800
RESULT_BLOCK_SECONDS = 1  # one blocking read of a job's result stream
RETRY_POLL_SECONDS = 0.05  # a retried job's next result is polled, not pushed

log = get_logger(__name__)


class RoutingError(ModelbusError):
    """A GPU job could not be placed or did not finish."""


class NoSuchWorkerError(RoutingError, NotFound):
    pass


class GpuJobTimeoutError(RoutingError, TimedOut):
    pass


class GpuJobFailedError(RoutingError, Failed):
    pass


class WorkerStoppedError(RoutingError, Failed):
    pass


# formats whose loads go to a CUDA worker where one is alive: bitsandbytes' kernels are CUDA's first (its CPU
# backend is the fallback, much slower; a worker where bitsandbytes does not import refuses the load)
_CUDA_FORMATS = frozenset({ModelFormat.BnbQuantizedNF4.value, ModelFormat.BnbQuantizedInt8.value})


def device_wanted(model_format: object) -> str | None:
    """The device type a record of ``model_format`` loads on best (``"cuda"``), or None: any worker."""
    return "cuda" if str(getattr(model_format, "value", model_format)) in _CUDA_FORMATS else None


@redis_errors_translated()
def worker_states(connection: Any, namespace: str) -> list[WorkerState]:
    """The live workers (those whose state has not expired), newest heartbeat first."""
    return read_worker_states(connection, Keys(namespace))


def gpu_workers(states: list[WorkerState]) -> list[WorkerState]:
    return [s for s in states if s.serves("gpu")]


def choose_gpu_worker(states: list[WorkerState], model_key: str, worker: str | None = None,
                      device: str | None = None) -> str | None:
    """The id of the worker that should serve ``model_key`` (on a ``device``-type worker where one is
    alive); None: use the shared queue."""
    gpu = gpu_workers(states)
    if worker is not None:
        if not any(s.id == worker for s in gpu):
            raise NoSuchWorkerError(f"no live GPU worker named {worker!r}")
        return worker
    if device is not None:
        gpu = [s for s in gpu if (s.device or "").split(":")[0] == device] or gpu
    holders = [s for s in gpu if s.holds(model_key)]
    if holders:
        return holders[0].id
    if not gpu:
        return None
    on_disk = [s for s in gpu if model_key in s.disk_models]  # its host cache has the blobs
    return max(on_disk or gpu, key=lambda s: s.vram_free or 0).id


@redis_errors_translated()
def wait_result(job: Job, timeout: float = 600.0) -> Any:
    """Block until the job ends; return its value or raise GpuJobFailedError with the worker's error.

    The wait is RQ's own push: a blocking read of the job's result stream (``Job.latest_result``), which
    the worker writes the moment the job ends, so a cache hit answers in a few round trips instead of a
    polling interval. The status is read only when no result comes (a cancelled job writes none)."""
    deadline = time.monotonic() + timeout
    while True:
        # a second at a time (RQ blocks in whole seconds): well inside the socket timeout, and the
        # deadline is checked between reads
        result = job.latest_result(timeout=RESULT_BLOCK_SECONDS)
        if result is not None and result.type == Result.Type.SUCCESSFUL:
            return result.return_value
        if result is not None and result.type != Result.Type.RETRIED:
            message = (result.exc_string or "").strip().splitlines()[-1:]
            raise GpuJobFailedError(message[0] if message else f"GPU job {job.id} {result.type.name.lower()}")
        status = getattr(job.get_status(refresh=True), "value", None)  # a JobStatus (None: the job expired)
        if status in ("failed", "stopped", "canceled"):
            raise GpuJobFailedError(f"GPU job {job.id} {status}")
        if time.monotonic() > deadline:
            raise GpuJobTimeoutError(f"GPU job {job.id} did not finish within {timeout:.0f}s (status {status})")
        if result is not None:  # retried: its next result comes later (the stream is read from its start)
            time.sleep(RETRY_POLL_SECONDS)


MAX_REROUTES = 3


def _alive(connection: Any, namespace: str, worker: str | None) -> bool:
    return worker is None or worker_alive(connection, Keys(namespace), worker)


@redis_errors_translated()
def enqueue_on(connection: Any, namespace: str, func: str, args: tuple[Any, ...], worker: str | None) -> Job:
    keys = Keys(namespace)
    name = keys.worker_queue(worker) if worker else keys.queue("gpu")
    return Queue(name, connection=connection).enqueue_call(func, args=args, timeout=GPU_JOB_TIMEOUT, result_ttl=3600)


@redis_errors_translated()
def run_gpu_job(connection: Any, namespace: str, func: str, args: tuple[Any, ...], *, model_key: str,
                worker: str | None = None, timeout: float = GPU_JOB_TIMEOUT,
                states: list[WorkerState] | None = None, device: str | None = None) -> tuple[Job, Any]:
    """Place a GPU job (affinity first), wait for it, and re-route it when its worker dies.

    A job sits on the chosen worker's own queue; if that worker's heartbeat stops (killed mid-load, or
    before it took the job), the job is cancelled there and placed again on a live worker, so a load
    finishes on another worker instead of waiting for a queue nobody reads.
    """
    deadline = time.monotonic() + timeout
    dead: set[str] = set()
    for _ in range(MAX_REROUTES + 1):
        # the caller's fresh read of the states serves the first placement; a re-route reads them again
        live = states if states is not None and not dead else worker_states(connection, namespace)
        target = choose_gpu_worker([s for s in live if s.id not in dead], model_key, worker, device)
        job = enqueue_on(connection, namespace, func, args, target)
        while True:
            try:
                return job, wait_result(job, timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except GpuJobTimeoutError:
                if time.monotonic() > deadline:
                    raise
            if not _alive(connection, namespace, target):
                if worker is not None:
                    raise WorkerStoppedError(f"GPU worker {worker!r} stopped while running job {job.id}")
                dead.add(str(target))
                try:
                    job.cancel()
                except (InvalidJobOperation, NoSuchJobError, redis.RedisError) as exc:
                    # already cancelled or gone with the dead worker's queue: nothing left to cancel
                    log.debug("dead_worker_job_not_cancelled", job=job.id, error=str(exc))
                break
    raise WorkerStoppedError(f"{func} for {model_key}: every GPU worker it was sent to stopped")
