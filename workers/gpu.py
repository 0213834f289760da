"""GPU worker jobs: load, unload and stats against this process's model cache.

GPU workers run jobs in their own process (SimpleWorker), so the ``ModelLoadService`` built here on the
first job — and its RAM/VRAM cache — lives from job to job. Its state (cached models, free VRAM) goes out
with every heartbeat, which is how ``services.routing`` sends a load to the worker already holding it.
"""

from __future__ import annotations

import time
from typing import Any

from modelbus.events.workers import CachedModel, CacheState, WorkerCache
from modelbus.workers.context import WorkerContext, current


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
    with info as model:
        device = str(_device_of(model))
    return {"model_key": model_key, "submodel": submodel, "worker": current().worker_id, "device": device,
            "location": str(info.location), "precision": str(info.precision),
            "seconds": time.perf_counter() - started}


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
