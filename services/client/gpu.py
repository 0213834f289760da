"""The client's side of GPU work: loads and unloads placed by ``services.routing`` on the GPU workers, their
results as ``events.jobs``' LoadOutcome and UnloadOutcome, and routing's errors as the client's (by kind).

Built from what it needs (a Redis connection and the namespace), not from the client.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
import pydantic
import redis
from rq.job import Job

from modelbus.events.jobs import CACHE_HIT_WAIT, CacheHitReply, CacheHitRequest, LoadOutcome, UnloadOutcome
from modelbus.events.keys import Keys
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
             timeout: float | None, model_format: object = None) -> LoadOutcome:
        gpu = self._gpu_workers()
        device = routing.device_wanted(model_format)
        if wait and not gpu:
            # waiting on a queue nobody reads would only time out: say why now
            raise UnavailableError("no GPU worker is running (start one: modelbus worker --queues gpu)")
        with translated():
            if not wait:
                target = routing.choose_gpu_worker(gpu, key, worker, device)
                job = self._enqueue(routing.LOAD_JOB, (key, submodel), target)
                return LoadOutcome(key=key, state="queued", job_id=job.id, submodel=submodel)
            target = routing.choose_gpu_worker(gpu, key, worker, device)
            if target is not None and any(s.id == target and s.holds(key) for s in gpu):
                hit = self._cache_hit(target, key, submodel)
                if hit is not None:
                    return hit
            job, result = routing.run_gpu_job(
                self.connection, self.namespace, routing.LOAD_JOB, (key, submodel),
                model_key=key, worker=worker, states=gpu, device=device,
                timeout=timeout if timeout is not None else routing.GPU_JOB_TIMEOUT)
        # the worker's answer (workers.gpu.load_job) as plain data over RQ: typed here, where it comes in
        return LoadOutcome.model_validate({**result, "key": key, "state": "loaded", "job_id": job.id})

    def _cache_hit(self, target: str, key: str, submodel: str | None) -> LoadOutcome | None:
        """Ask the worker that holds ``key`` to answer from its cache (workers.gpu.HitServer): two round
        trips instead of an RQ job's dozen. None (then RQ) when it no longer holds it or does not answer
        within CACHE_HIT_WAIT s (frozen, gone, or a worker that predates the hit list)."""
        keys = Keys(self.namespace)
        request = CacheHitRequest(id=uuid.uuid4().hex, model_key=key, submodel=submodel, sent=time.time())
        pipe = self.connection.pipeline(transaction=False)
        pipe.rpush(keys.gpu_hits(target), request.model_dump_json())
        pipe.expire(keys.gpu_hits(target), int(CACHE_HIT_WAIT) + 10)  # a gone worker's list goes too
        pipe.execute()
        popped = self.connection.blpop([keys.gpu_reply(request.id)], timeout=CACHE_HIT_WAIT)
        if popped is None:
            return None
        try:
            reply = CacheHitReply.model_validate(orjson.loads(popped[1]))
        except (pydantic.ValidationError, orjson.JSONDecodeError):
            return None
        return reply.outcome if reply.held else None

    def unload(self, key: str, worker: str | None) -> UnloadOutcome:
        with translated():
            gpu = self._gpu_workers()
            targets = [routing.choose_gpu_worker(gpu, key, worker)] if worker else [w.id for w in gpu]
            jobs = [self._enqueue(routing.UNLOAD_JOB, (key,), t) for t in targets]
            results = [routing.wait_result(j, UNLOAD_TIMEOUT) for j in jobs]
        dropped = [r for r in results if r.get("dropped")]
        return UnloadOutcome(key=key, state="unloaded" if dropped else "not_loaded",
                             workers=tuple(str(w) for r in dropped if (w := r.get("worker"))))
