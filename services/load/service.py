"""``ModelLoadService``: the spec's "Let's get loaded", on top of the RAM/VRAM :class:`ModelCache`.

Events. Every ``get_model`` publishes ``model_load_started`` then ``model_load_completed`` (or
``model_load_failed``) through ``publisher(event)``, typed activity events of ``events.schema`` (the GPU
worker passes the event store's ``publish``); cache evictions go out as ``cache_evicted``.
When ``context`` is given, its identifiers fill the payload and the event also goes to the
context's own bus, as ``(kind, payload dict)``. The context protocol, tried in this order:

1. ``context.emit(event_type, payload)`` when ``context`` has a callable ``emit``;
2. ``context.services.events.emit_<event_type>(**payload)`` (InvokeAI's invocation context shape).

Identifiers (``queue_id``, ``queue_item_id``, ``queue_batch_id``, ``graph_execution_state_id``)
are read as attributes of ``context`` or, when it is a mapping, as its items.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modelbus.events.logs import get_logger
from modelbus.events.schema import (
    Activity,
    CacheEvicted,
    CacheEvictedPayload,
    LoadContext,
    LoadFailedPayload,
    LoadPayload,
    ModelLoadCompleted,
    ModelLoadFailed,
    ModelLoadStarted,
)
from modelbus.services.load.cache import CacheEntry, ModelCache, ModelLocker
from modelbus.services.load.errors import (
    CacheOutOfMemoryError,
    InvalidModelException,
    LoadError,
    ModelNotFoundException,
    SubmodelRequiredError,
)
from modelbus.services.load.estimate import estimate_bytes
from modelbus.services.load.fp8 import keeps_fp8
from modelbus.services.load.host_memory import configure as configure_host_memory
from modelbus.services.load.kit import Loaded, LoadRequest
from modelbus.services.load.registry import loader_for
from modelbus.services.records.enums import BaseModelType, ModelFormat, ModelType, SubModelType

log = get_logger(__name__)

Publisher = Callable[[Activity], object]  # what it returns (a stream position...) is ignored
CONTEXT_FIELDS = ("queue_id", "queue_item_id", "queue_batch_id", "graph_execution_state_id")
# bases whose single-file checkpoints hold a transformer, which older callers ask for as "unet"
_TRANSFORMER_BASES = (BaseModelType.Flux, BaseModelType.StableDiffusion3, BaseModelType.StableDiffusion35Medium,
                      BaseModelType.StableDiffusion35Large)


def execution_device(setting: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU."""
    if setting != "auto":
        return torch.device(setting)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def inference_dtype(precision: str, device: torch.device) -> torch.dtype:
    """fp32 on the CPU; fp16 on an accelerator unless ``bfloat16`` or ``float32`` is configured."""
    if device.type == "cpu":
        return torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(precision, torch.float16)


@dataclass
class ModelInfo:
    """The spec's ModelInfo; ``with info as model:`` locks the model on the execution device."""

    key: str
    name: str
    base_model: BaseModelType
    type: ModelType | SubModelType
    location: Path
    precision: torch.dtype
    context: ModelLocker
    hash: str
    submodel: SubModelType | None = None
    cache_hit: bool = False
    bytes: int = 0
    _entry: CacheEntry | None = field(default=None, repr=False)

    @property
    def model(self) -> Any:
        """The cached object, unlocked (prefer the ``with`` form, which also moves it to the device)."""
        return self._entry.model if self._entry is not None else None

    def __enter__(self) -> Any:
        return self.context.lock()

    def __exit__(self, *exc: object) -> None:
        self.context.unlock()


def _context_value(context: Any, name: str) -> Any:
    if isinstance(context, Mapping):
        return context.get(name)
    return getattr(context, name, None)


def _bus_emit(context: Any, event_type: str, payload: dict[str, Any]) -> None:
    emit = getattr(context, "emit", None)
    if callable(emit):
        emit(event_type, payload)
        return
    events = getattr(getattr(context, "services", None), "events", None)
    method = getattr(events, f"emit_{event_type}", None)
    if callable(method):
        method(**payload)


class ModelLoadService:
    """Loads models named by their record key into the cache and hands them out locked."""

    def __init__(self, config: Any, store: Any, publisher: Publisher | None = None, *,
                 cache: ModelCache | None = None, worker_id: str | None = None,
                 locate: Callable[[Any], Path] | None = None) -> None:
        self.config = config
        self.store = store
        self.publisher = publisher
        self.locate = locate  # a record's files on this host (e.g. fetched from the store); None: the models dir
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        device = execution_device(str(getattr(config, "device", "auto")))
        self.cache = cache or ModelCache(execution_device=device, ram_limit=int(config.ram_cache_size),
                                         vram_limit=int(config.vram_cache_size),
                                         keep_alive=float(getattr(config, "cache_keep_alive", 0.0)))
        configure_host_memory(int(float(getattr(config, "cpu_recycle_mb", 4096)) * (1 << 20)),
                              float(getattr(config, "cpu_recycle_idle_s", 60.0)))
        if self.cache.on_event is None:
            self.cache.on_event = self._cache_event
        self.precision = inference_dtype(str(getattr(config, "precision", "auto")), self.cache.execution_device)
        # decided for the execution device, whether a load parks the model in RAM first or not
        self.fp8_storage = keeps_fp8(str(getattr(config, "fp8_storage", "auto")), self.cache.execution_device)
        self.gguf_dequantize = bool(getattr(config, "gguf_dequantize", False))

    @property
    def execution_device(self) -> torch.device:
        return self.cache.execution_device

    def get_model(self, key: str, submodel_type: SubModelType | str | None = None, context: Any = None) -> ModelInfo:
        info = self._get(key, submodel_type, context, hits_only=False)
        assert info is not None
        return info

    def get_cached(self, key: str, submodel_type: SubModelType | str | None = None,
                   context: Any = None) -> ModelInfo | None:
        """``get_model`` for a model this cache already holds (the same checks and events); None, and no
        event, when it does not: the caller loads it the usual way."""
        return self._get(key, submodel_type, context, hits_only=True)

    def _get(self, key: str, submodel_type: SubModelType | str | None, context: Any,
             hits_only: bool) -> ModelInfo | None:
        record = self.store.get_model(key)  # UnknownModelException propagates
        model_type = ModelType(record.model_type)
        submodel = SubModelType(submodel_type) if submodel_type is not None else None
        if model_type == ModelType.Main and submodel is None:
            raise SubmodelRequiredError(f"model {key} ({record.name}) is a main model: name a submodel_type")
        if model_type != ModelType.Main:
            submodel = None  # a VAE, LoRA... is one part: a submodel type means nothing for it
        elif submodel == SubModelType.UNet and record.model_format == ModelFormat.Checkpoint \
                and record.base_model in _TRANSFORMER_BASES:
            submodel = SubModelType.Transformer  # the older name of their denoiser: one cache entry for both
        location = self.locate(record) if self.locate is not None else self.config.model_path(record.path)
        if not location.exists():
            raise ModelNotFoundException(f"model {key} ({record.name}): nothing at {location}")
        cache_key = f"{key}:{submodel.value}" if submodel is not None else key
        request = LoadRequest(record, location, submodel, self.execution_device, self.precision,
                              self.fp8_storage, self.gguf_dequantize)
        ids = self._payload(record, submodel, location, context)
        hit_before = cache_key in self.cache
        if hits_only and not hit_before:
            return None
        self._announce(ModelLoadStarted(aggregate_id=self.worker_id, payload=LoadPayload(
            **ids.model_dump(), cache_hit=hit_before, seconds=0.0, bytes=0)), context)
        start = time.perf_counter()
        try:
            entry, hit = self.cache.get_or_load(cache_key, self._loader(request), model_key=key,
                                                submodel=submodel.value if submodel else None,
                                                size_hint=0 if hit_before else estimate_bytes(request))
        except Exception as exc:
            self._announce(ModelLoadFailed(aggregate_id=self.worker_id, payload=LoadFailedPayload(
                **ids.model_dump(), error=f"{type(exc).__name__}: {exc}")), context)
            raise
        seconds = time.perf_counter() - start
        self._announce(ModelLoadCompleted(aggregate_id=self.worker_id, payload=LoadPayload(
            **ids.model_dump(), cache_hit=hit, seconds=seconds, bytes=entry.size,
            resident_bytes=self.cache.resident_bytes(cache_key))), context)
        return ModelInfo(key=key, name=record.name, base_model=BaseModelType(record.base_model),
                         type=submodel or model_type, location=location, precision=self.precision,
                         context=self.cache.locker(cache_key), hash=record.hash, submodel=submodel,
                         cache_hit=hit, bytes=entry.size, _entry=entry)

    def drop_model(self, key: str) -> list[str]:
        """Forget every cached part of a model (e.g. after it was deleted or changed on disk)."""
        return self.cache.drop_model(key)

    def _loader(self, request: LoadRequest) -> Callable[[torch.device], Loaded]:
        load = loader_for(request.record.model_type, request.record.model_format)

        def run(device: torch.device) -> Loaded:
            # parked in RAM or not, weights take the inference dtype: a later move to VRAM is one copy
            req = LoadRequest(request.record, request.location, request.submodel, device, self.precision,
                              self.fp8_storage, self.gguf_dequantize)
            try:
                return load(req)
            except LoadError:
                raise
            except FileNotFoundError as exc:
                raise ModelNotFoundException(f"{request.location}: {exc}") from exc
            except torch.OutOfMemoryError as exc:
                raise CacheOutOfMemoryError(f"out of memory loading {request.location}: {exc}") from exc
            except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as exc:
                what = f"{request.record.model_type}/{request.record.model_format}"
                raise InvalidModelException(f"{request.location} does not load as a {what} model: "
                                            f"{type(exc).__name__}: {exc}") from exc

        return run

    def _payload(self, record: Any, submodel: SubModelType | None, location: Path, context: Any) -> LoadContext:
        ids = {name: (_context_value(context, name) if context is not None else None) for name in CONTEXT_FIELDS}
        return LoadContext(**ids, model_key=record.key, submodel=submodel.value if submodel else None,
                           hash=record.hash, location=str(location), precision=str(self.precision),
                           worker=self.worker_id, device=str(self.execution_device))

    def _announce(self, event: Activity, context: Any) -> None:
        self._publish(event)
        if context is not None:
            try:
                _bus_emit(context, event.kind, event.payload.model_dump())
            except Exception as exc:  # noqa: BLE001 - the caller's bus may raise anything; the load goes on
                log.warning("context_event_failed", event=event.kind, error=str(exc))

    def _cache_event(self, kind: str, payload: dict[str, Any]) -> None:
        """The cache's own news (evictions), as typed events from this worker."""
        if kind == CacheEvicted.model_fields["kind"].default:
            self._publish(CacheEvicted(aggregate_id=self.worker_id, payload=CacheEvictedPayload(
                **payload, worker=self.worker_id)))

    def _publish(self, event: Activity) -> None:
        if self.publisher is None:
            return
        try:
            self.publisher(event)
        except Exception as exc:  # noqa: BLE001 - an injected publisher; the activity stream is best effort
            log.warning("publish_failed", event=event.kind, error=str(exc))
