"""GPU worker jobs: load, unload and stats against this process's model cache.

GPU workers run jobs in their own process (SimpleWorker), so the ``ModelLoadService`` built here on the
first job — and its RAM/VRAM cache — lives from job to job. Its state (cached models, free VRAM) goes out
with every heartbeat, which is how ``services.routing`` sends a load to the worker already holding it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import orjson
import pydantic
import redis

from modelbus.events.jobs import CACHE_HIT_WAIT, CacheHitReply, CacheHitRequest, LoadOutcome
from modelbus.events.keys import Keys
from modelbus.events.logs import get_logger
from modelbus.events.workers import CachedModel, CacheState, WorkerCache
from modelbus.workers.context import WorkerContext, current

log = get_logger(__name__)

HIT_REPLY_TTL = 10  # s an answer waits in Redis for its caller (then it expires)
HIT_BACKOFF = 1.0   # s the hit server waits after a Redis error before it listens again


def _records(context: WorkerContext) -> Any:
    from modelbus.services.records import ModelRecordServiceMemory
    # an in-memory projection per worker: no file shared between processes, rebuilt by replay on start
    return ModelRecordServiceMemory(context.store, config=context.config)


def _load_service(context: WorkerContext) -> Any:
    from modelbus.services.load import ModelLoadService
    records = context.get("records", _records)
    worker = context.worker_id

    def publish(kind: str, payload: dict[str, Any]) -> None:
        context.store.publish_activity(kind, {"worker": worker, **payload}, source=worker)

    fetcher = context.get("fetcher", lambda c: _fetcher(c, records, publish))
    return ModelLoadService(context.config, records, publisher=context.store.publish, worker_id=worker,
                            locate=fetcher.locate if fetcher is not None else None)


def _fetcher(context: WorkerContext, records: Any, publish: Any) -> Any:
    """With a model store, loads read the host cache, fetching what it lacks; None: the models dir."""
    from modelbus.services.store import open_store
    from modelbus.services.store.fetcher import ModelFetcher
    store = open_store(context.config)
    return ModelFetcher(context.config, store, records, publish) if store is not None else None


def load_service() -> Any:
    return current().get("load_service", _load_service)


class JobContext:
    """The spec's invocation context as far as load events need it: the queue ids of the caller."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.queue_id = fields.get("queue_id")
        self.queue_item_id = fields.get("queue_item_id")
        self.queue_batch_id = fields.get("queue_batch_id")
        self.graph_execution_state_id = fields.get("graph_execution_state_id")


def load_job(model_key: str, submodel: str | None = None, context: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a model (or one submodel) into this worker's cache, warm for the next use."""
    from modelbus.services.records import SubModelType
    service = load_service()
    started = time.perf_counter()
    info = service.get_model(model_key, SubModelType(submodel) if submodel else None,
                             context=JobContext(context) if context else None)
    return _loaded(info, model_key, submodel, started)


def _loaded(info: Any, model_key: str, submodel: str | None, started: float) -> dict[str, Any]:
    with info as model:
        device = str(_device_of(model))
    return {"model_key": model_key, "submodel": submodel, "worker": current().worker_id, "device": device,
            "location": str(info.location), "precision": str(info.precision),
            "seconds": time.perf_counter() - started}


class HitServer(threading.Thread):
    """Answers loads of models this worker already holds without RQ: a caller whose routing picked this
    worker for a model its heartbeat lists pushes a :class:`CacheHitRequest` on ``Keys.gpu_hits`` and
    waits on its reply list. A hit is the same ``get_model`` (record check, load events, lock and
    unlock) as a load job; a model no longer cached (evicted since the beat), a record that changed or
    any error is ``held: false``, and the caller loads through RQ, which reports errors the usual way.
    The cache is shared with the RQ job thread under the cache's own lock."""

    def __init__(self, connection: redis.Redis, keys: Keys, worker_id: str) -> None:
        super().__init__(daemon=True, name="modelbus-cache-hits")
        self.connection, self.keys, self.worker_id = connection, keys, worker_id
        self.stopped = threading.Event()

    def run(self) -> None:
        queue = self.keys.gpu_hits(self.worker_id)
        while not self.stopped.is_set():
            try:
                popped = self.connection.blpop([queue], timeout=1)
                if popped is not None:
                    self.answer(popped[1])
            except redis.RedisError as exc:  # Redis restarting: listen again after a pause
                log.debug("cache_hits_redis_error", worker=self.worker_id, error=str(exc))
                self.stopped.wait(HIT_BACKOFF)

    def answer(self, raw: bytes) -> None:
        try:
            request = CacheHitRequest.model_validate_json(raw)
        except pydantic.ValidationError:
            log.warning("cache_hit_request_refused", worker=self.worker_id, size=len(raw))
            return
        if time.time() - request.sent > CACHE_HIT_WAIT:
            return  # its caller has stopped waiting and loads through RQ
        reply = CacheHitReply(held=False)
        started = time.perf_counter()
        try:
            info = _cached(request.model_key, request.submodel)
            if info is not None:
                loaded = _loaded(info, request.model_key, request.submodel, started)
                reply = CacheHitReply(held=True, outcome=LoadOutcome.model_validate(
                    {**loaded, "key": request.model_key, "state": "loaded", "job_id": request.id}))
        except Exception as exc:  # noqa: BLE001 - the RQ load reports it to the caller, typed
            log.info("cache_hit_declined", worker=self.worker_id, model=request.model_key, error=str(exc))
        pipe = self.connection.pipeline(transaction=False)
        pipe.rpush(self.keys.gpu_reply(request.id), orjson.dumps(reply.model_dump(mode="json")))
        pipe.expire(self.keys.gpu_reply(request.id), HIT_REPLY_TTL)
        pipe.execute()

    def stop(self) -> None:
        self.stopped.set()


def _cached(model_key: str, submodel: str | None) -> Any:
    """The model from this worker's cache, or None: no load service yet means nothing is cached."""
    service = current().extras.get("load_service")
    if service is None:
        return None
    from modelbus.services.records import SubModelType
    return service.get_cached(model_key, SubModelType(submodel) if submodel else None)


def unload_job(model_key: str) -> dict[str, Any]:
    """Drop a model (every submodel) from this worker's cache."""
    dropped = load_service().cache.drop_model(model_key)
    return {"model_key": model_key, "worker": current().worker_id, "dropped": list(dropped)}


def stats_job() -> dict[str, Any]:
    return {"worker": current().worker_id, **cache_state().model_dump(mode="json")}


def cache_state() -> WorkerCache:
    """What the heartbeat publishes of the cache: the device, cached models and free VRAM."""
    context = current()
    service = context.extras.get("load_service")
    if service is None:
        return WorkerCache(device=context.device, disk_models=_disk_models(context),
                           vram_free=_free_vram(context.device))
    cache = service.cache
    cache.evict_idle()  # keep-alive expiry runs on the heartbeat, not only on the next load
    stats = cache.stats()
    models = tuple(CachedModel.model_validate(e.to_dict()) for e in cache.contents())
    fetcher = context.extras.get("fetcher")
    if fetcher is not None:  # what is loaded here keeps its blobs in the host cache
        fetcher.cache.pin({m.model_key for m in models})
    return WorkerCache(device=str(service.execution_device), vram_free=stats.vram_free, models=models,
                       disk_models=_disk_models(context), stats=CacheState.model_validate(stats.to_dict()))


def _disk_models(context: WorkerContext) -> tuple[str, ...]:
    """The models this host's store cache holds (routing's disk affinity); none without a store."""
    if context.config.store_url == "shared":
        return ()
    from modelbus.services.store.cache import held_models
    return tuple(held_models(context.config.cache_path))


def _free_vram(device: str | None) -> int | None:
    try:
        import torch
        if device and device.startswith("cuda") and torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            return int(free)
    except (ImportError, RuntimeError, ValueError):  # no torch, or a device CUDA cannot query
        return None
    return None


def _device_of(model: Any) -> Any:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return "cpu"
