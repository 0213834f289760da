"""The client's side of GPU work: loads and unloads placed by ``services.routing`` on the GPU workers, their
results as ``events.jobs``' LoadOutcome and UnloadOutcome, and routing's errors as the client's (by kind).

Built from what it needs (a Redis connection and the namespace), not from the client.
"""

from __future__ import annotations

from typing import Any

import redis
from rq.job import Job

from modelbus.events.jobs import LoadOutcome, UnloadOutcome
from modelbus.events.workers import WorkerState
from modelbus.services import routing
from modelbus.services.client.errors import UnavailableError, translated

UNLOAD_TIMEOUT = 60.0


class GpuLoads:
    def __init__(self, connection: redis.Redis, namespace: str) -> None:
        self.connection, self.namespace = connection, namespace

    def _gpu_workers(self) -> list[WorkerState]:
        return routing.gpu_workers(routing.worker_states(self.connection, self.namespace))

    def _enqueue(self, func: str, args: tuple[Any, ...], worker: str | None) -> Job:
        """Enqueue a GPU job on a worker's own queue (None: the shared ``gpu`` queue).

        The choice of worker is routing's."""
        return routing.enqueue_on(self.connection, self.namespace, func, args, worker)

    def load(self, key: str, submodel: str | None, worker: str | None, wait: bool,
             timeout: float | None) -> LoadOutcome:
        gpu = self._gpu_workers()
        if wait and not gpu:
            # waiting on a queue nobody reads would only time out: say why now
            raise UnavailableError("no GPU worker is running (start one: modelbus worker --queues gpu)")
        with translated():
            if not wait:
                target = routing.choose_gpu_worker(gpu, key, worker)
                job = self._enqueue(routing.LOAD_JOB, (key, submodel), target)
                return LoadOutcome(key=key, state="queued", job_id=job.id, submodel=submodel)
            job, result = routing.run_gpu_job(
                self.connection, self.namespace, routing.LOAD_JOB, (key, submodel),
                model_key=key, worker=worker,
                timeout=timeout if timeout is not None else routing.GPU_JOB_TIMEOUT)
        # the worker's answer (workers.gpu.load_job) as plain data over RQ: typed here, where it comes in
        return LoadOutcome.model_validate({**result, "key": key, "state": "loaded", "job_id": job.id})

    def unload(self, key: str, worker: str | None) -> UnloadOutcome:
        with translated():
            gpu = self._gpu_workers()
            targets = [routing.choose_gpu_worker(gpu, key, worker)] if worker else [w.id for w in gpu]
            jobs = [self._enqueue(routing.UNLOAD_JOB, (key,), t) for t in targets]
            results = [routing.wait_result(j, UNLOAD_TIMEOUT) for j in jobs]
        dropped = [r for r in results if r.get("dropped")]
        return UnloadOutcome(key=key, state="unloaded" if dropped else "not_loaded",
                             workers=tuple(str(w) for r in dropped if (w := r.get("worker"))))
