"""The model cache: a RAM tier and a VRAM tier, each with a byte limit.

- Sizes are measured from parameters and buffers (:mod:`services.load.tensors`).
- Unlocked models leave in least-recently-used order: VRAM -> RAM -> out. A locked model is
  never evicted. A model larger than the tier that must hold it is refused with
  :class:`ModelTooLargeError` before anything is allocated, except a module larger than the VRAM
  tier on a CUDA device (``partial``): it is kept in pinned RAM, and as many of its blocks as the
  VRAM limit leaves room for are resident while the rest stream in during the forward pass
  (:mod:`services.load.streaming`); it counts its resident part and staging buffers in VRAM.
- With a CUDA execution device, RAM copies are pinned and kept while the model sits in VRAM
  (a spare copy that is released first under RAM pressure), so offload and reload are single
  pinned copies at bus speed. The pinned memory comes from a pool the size of ``ram_limit``,
  pinned in the background when the cache starts (:mod:`services.load.pinned`), so the first
  offload of a model is as fast as the later ones.
- Thread-safe: one re-entrant lock guards the state; loads run outside it, and concurrent
  requests for one key wait for the single load in flight.
- Events (``cache_evicted``) are handed to ``on_event(type, payload)`` after the lock is released.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from modelbus.events.logs import get_logger
from modelbus.services.load.errors import CacheOutOfMemoryError, ModelTooLargeError
from modelbus.services.load.kit import Loaded
from modelbus.services.load.pinned import PinnedPool
from modelbus.services.load.stats import CacheStats, EntryInfo
from modelbus.services.load.streaming import Streamed, attach
from modelbus.services.load.tensors import move_object, object_nbytes, tensor_slots

log = get_logger(__name__)

EventSink = Callable[[str, dict[str, Any]], None]
_OOM_ERRORS: tuple[type[BaseException], ...] = (torch.OutOfMemoryError, RuntimeError)




@dataclass
class CacheEntry:
    key: str
    model_key: str
    submodel: str | None
    model: Any
    size: int
    device: torch.device | None          # None: holds no tensors (tokenizer, scheduler)
    buffer: torch.Tensor | None          # the flat buffer the tensors live in now
    host_buffer: torch.Tensor | None     # the RAM copy (== buffer while in RAM)
    last_used: float
    locks: int = 0
    load_seconds: float = 0.0
    streamed: Streamed | None = None     # partially resident: the rest streams in during forward

    @property
    def resident_bytes(self) -> int:
        return self.streamed.resident_bytes if self.streamed is not None else 0

    @property
    def locked(self) -> bool:
        return self.locks > 0


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


@dataclass
class ModelCache:
    execution_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ram_limit: int = 8 << 30
    vram_limit: int = 16 << 30
    keep_alive: float = 0.0
    on_event: EventSink | None = None
    pin_memory: bool | None = None
    clock: Callable[[], float] = time.monotonic
    partial: bool = True  # stream modules larger than vram_limit instead of refusing them
    host_pool: PinnedPool | None = None  # None: one the size of ram_limit when pinning (MODELBUS_PINNED_POOL=0: none)

    def __post_init__(self) -> None:
        self.execution_device = torch.device(self.execution_device)
        if self.execution_device.type == "cuda" and self.execution_device.index is None:
            self.execution_device = torch.device("cuda", torch.cuda.current_device())
        if self.pin_memory is None:
            self.pin_memory = self.execution_device.type == "cuda"
        if self.host_pool is None and self.pin_memory and self.execution_device.type == "cuda" \
                and os.environ.get("MODELBUS_PINNED_POOL", "1") != "0":
            self.host_pool = PinnedPool(self.ram_limit, device=self.execution_device)
        self._lock = threading.RLock()
        self._entries: dict[str, CacheEntry] = {}  # insertion order is not LRU: last_used is
        self._loading: dict[str, threading.Event] = {}
        self._reserved_vram = 0
        self._events: list[tuple[str, dict[str, Any]]] = []
        self.stats_ = CacheStats()

    # ---- queries -------------------------------------------------------------------------
    @property
    def uses_vram(self) -> bool:
        return self.execution_device.type != "cpu"

    def _on_vram(self, e: CacheEntry) -> bool:
        return self.uses_vram and e.device is not None and e.device.type != "cpu"

    def ram_used(self) -> int:
        with self._lock:
            return sum(e.host_buffer.numel() if e.host_buffer is not None else
                       (e.size if not self._on_vram(e) else 0) for e in self._entries.values())

    def vram_used(self) -> int:
        with self._lock:
            return sum(e.size if self._on_vram(e) else e.streamed.device_bytes if e.streamed is not None else 0
                       for e in self._entries.values())

    def _streams(self, size: int, model: Any = None) -> bool:
        """Whether an object of ``size`` bytes is served partially resident (too large for VRAM)."""
        return (self.partial and self.execution_device.type == "cuda" and size > self.vram_limit
                and (model is None or isinstance(model, torch.nn.Module)))

    def free_vram(self) -> int:
        """Bytes the VRAM tier could still take (limit minus use, capped by the device's free memory)."""
        if not self.uses_vram:
            return 0
        room = self.vram_limit - self.vram_used() - self._reserved_vram
        return max(min(room, self._device_free()), 0)

    def resident_bytes(self, key: str) -> int:
        """Bytes of ``key`` on the execution device: all in VRAM, the resident part when streamed, else 0."""
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                return 0
            return e.size if self._on_vram(e) else e.resident_bytes

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def contents(self) -> list[EntryInfo]:
        """What the cache holds, most recently used first (for the worker's registry in Redis)."""
        now = self.clock()
        with self._lock:
            entries = sorted(self._entries.values(), key=lambda e: e.last_used, reverse=True)
            return [EntryInfo(key=e.key, model_key=e.model_key, submodel=e.submodel, bytes=e.size,
                              device=str(e.device) if e.device is not None else "none",
                              tier=self._tier(e), locked=e.locked,
                              idle_seconds=now - e.last_used, ram_copy=e.host_buffer is not None,
                              resident_bytes=e.size if self._on_vram(e) else e.resident_bytes)
                    for e in entries]

    def stats(self) -> CacheStats:
        with self._lock:
            return self.stats_.snapshot(ram_used=self.ram_used(), ram_limit=self.ram_limit,
                                        vram_used=self.vram_used(), vram_limit=self.vram_limit,
                                        vram_free=self.free_vram(), models=len(self._entries))

    # ---- get / load ------------------------------------------------------------------------
    def get(self, key: str) -> CacheEntry | None:
        """A cached entry (counted as a hit and touched), or None."""
        with self._lock:
            e = self._entries.get(key)
            if e is not None:
                e.last_used = self.clock()
                self.stats_.hit(self._tier(e))
            return e

    def get_or_load(self, key: str, load: Callable[[torch.device], Loaded], *, model_key: str | None = None,
                    submodel: str | None = None, size_hint: int = 0) -> tuple[CacheEntry, bool]:
        """The entry for ``key`` and whether it was a hit; loads it once however many threads ask."""
        while True:
            with self._lock:
                self._evict_idle_locked()
                hit = self.get(key)
                if hit is not None:
                    events = self._take_events()
                    break
                waiting = self._loading.get(key)
                if waiting is None:
                    self._loading[key] = threading.Event()
                    events = self._take_events()
                    hit = None
                    break
            waiting.wait()  # another thread loads it: then it is a hit (or it failed: try ourselves)
        self._emit(events)
        if hit is not None:
            return hit, True
        try:
            return self._load(key, load, model_key or key, submodel, size_hint), False
        finally:
            with self._lock:
                self._loading.pop(key).set()

    def _load(self, key: str, load: Callable[[torch.device], Loaded], model_key: str, submodel: str | None,
              size_hint: int) -> CacheEntry:
        with self._lock:
            self._check_size(key, size_hint)
            device = self._placement(size_hint)
            reserved = size_hint if device.type != "cpu" else 0
            self._reserved_vram += reserved
            events = self._take_events()
        self._emit(events)
        start = time.perf_counter()
        try:
            loaded = load(device)
        finally:
            with self._lock:
                self._reserved_vram -= reserved
        seconds = time.perf_counter() - start
        size = object_nbytes(loaded.model)
        slots = tensor_slots(loaded.model)
        actual = slots[0].tensor.device if slots else None
        with self._lock:
            self._check_size(key, size, loaded.model)
            on_cpu = actual is None or actual.type == "cpu"
            entry = CacheEntry(key, model_key, submodel, loaded.model, size, actual, loaded.buffer,
                               loaded.buffer if on_cpu else None, self.clock(), load_seconds=seconds)
            if on_cpu:
                self._make_room_ram(size, exclude=key)
                self._entries[key] = entry
                if self._streams(size, loaded.model):
                    try:  # loaded "to VRAM" as far as it fits; a lock retries when it could not
                        self._stream(entry)
                    except CacheOutOfMemoryError as exc:
                        log.warning("partial_load_deferred", key=key, error=str(exc))
            else:
                fits = self._make_room_vram(size, exclude=key)
                self._entries[key] = entry
                if not fits:  # the size hint was low and locked models fill VRAM: park it in RAM
                    self._offload(entry, reason="lru")
            self.stats_.miss("vram" if self._on_vram(entry) else "ram", size, seconds)
            events = self._take_events()
        self._emit(events)
        log.info("model_cached", key=key, bytes=size, device=str(actual), seconds=round(seconds, 4))
        return entry

    def _check_size(self, key: str, size: int, model: Any = None) -> None:
        if self._streams(size, model) and size <= self.ram_limit:
            return  # held in RAM, streamed to the device
        if self.uses_vram and size > self.vram_limit:
            raise ModelTooLargeError(f"model {key} needs {_gib(size)}, more than the VRAM cache's limit of "
                                     f"{_gib(self.vram_limit)} (MODELBUS_VRAM_CACHE_SIZE)")
        if not self.uses_vram and size > self.ram_limit:
            raise ModelTooLargeError(f"model {key} needs {_gib(size)}, more than the RAM cache's limit of "
                                     f"{_gib(self.ram_limit)} (MODELBUS_RAM_CACHE_SIZE)")

    def _placement(self, size_hint: int) -> torch.device:
        """Load straight to the execution device when VRAM can make room, else to RAM."""
        if self.uses_vram and not self._streams(size_hint) and self._make_room_vram(size_hint, exclude=None):
            return self.execution_device
        if not self._make_room_ram(size_hint, exclude=None):
            raise ModelTooLargeError(f"no room in the RAM cache for {_gib(size_hint)}: "
                                     f"{_gib(self.ram_used())} of {_gib(self.ram_limit)} held by locked models")
        return torch.device("cpu")

    # ---- locking ---------------------------------------------------------------------------
    def lock(self, key: str) -> Any:
        """Pin ``key`` against eviction and put it on the execution device; returns the model."""
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                raise KeyError(f"model {key} is not in the cache (dropped?)")
            e.locks += 1
            e.last_used = self.clock()
            try:
                if self.uses_vram and e.device is not None and not self._on_vram(e) and e.streamed is None:
                    if self._streams(e.size, e.model):
                        self._stream(e)
                    else:
                        self._to_vram(e)
            except BaseException:
                e.locks -= 1
                raise
            finally:
                events = self._take_events()
        self._emit(events)
        return e.model

    def unlock(self, key: str) -> None:
        with self._lock:
            e = self._entries.get(key)
            if e is not None and e.locks > 0:
                e.locks -= 1
                e.last_used = self.clock()

    def locker(self, key: str) -> ModelLocker:
        return ModelLocker(self, key)

    # ---- moves ----------------------------------------------------------------------------
    def _to_vram(self, e: CacheEntry) -> None:
        if not self._make_room_vram(e.size, exclude=e.key):
            raise CacheOutOfMemoryError(
                f"cannot place {e.key} ({_gib(e.size)}) in VRAM: {_gib(self.vram_used())} of "
                f"{_gib(self.vram_limit)} held by locked models")
        for attempt in range(2):
            try:
                e.buffer = move_object(e.model, e.buffer, self.execution_device)
                e.device = self.execution_device
                self.stats_.moved("vram", e.size)
                return
            except _OOM_ERRORS as exc:
                if not _is_oom(exc) or attempt == 1:
                    if _is_oom(exc):
                        raise CacheOutOfMemoryError(f"out of device memory moving {e.key} to "
                                                    f"{self.execution_device}: {exc}") from exc
                    raise
                # memory held outside our accounting: give back every unlocked model, then retry once
                for other in self._lru(vram=True, exclude=e.key):
                    self._offload(other, reason="oom")
                torch.cuda.empty_cache()

    def _stream(self, e: CacheEntry) -> None:
        """Attach a model too large for VRAM for streaming, with all the room VRAM can make."""
        for victim in self._lru(vram=True, exclude=e.key):
            self._offload(victim, reason="lru")
        room = self.vram_limit - self.vram_used() - self._reserved_vram
        room = min(room, self._device_free())
        if self.pin_memory and e.buffer is not None and not e.buffer.is_pinned():
            # streamed copies overlap compute only from pinned memory: repack the RAM copy once
            e.buffer = e.host_buffer = move_object(e.model, e.buffer, torch.device("cpu"), pin=True,
                                                   pool=self.host_pool)
        try:
            e.streamed = attach(e.model, self.execution_device, room)
        except (MemoryError, torch.OutOfMemoryError, RuntimeError) as exc:
            if not isinstance(exc, MemoryError) and not _is_oom(exc):
                raise
            raise CacheOutOfMemoryError(f"cannot stream {e.key} ({_gib(e.size)}) within {_gib(max(room, 0))} of "
                                        f"VRAM: {exc}") from exc
        self.stats_.moved("vram", e.streamed.resident_bytes)
        log.info("model_streamed", key=e.key, bytes=e.size, resident_bytes=e.streamed.resident_bytes,
                 staging_bytes=e.streamed.staging_bytes, room=room)

    def offload(self, key: str) -> bool:
        """Move an unlocked model from VRAM to RAM now; False when it is locked or not in VRAM."""
        with self._lock:
            e = self._entries.get(key)
            if e is None or e.locked or not (self._on_vram(e) or e.streamed is not None):
                return False
            self._offload(e, reason="request")
            events = self._take_events()
        self._emit(events)
        return True

    def _offload(self, e: CacheEntry, reason: str) -> None:
        """VRAM -> RAM, or out when RAM cannot take it. The cache stays consistent on failure."""
        if e.streamed is not None:  # its whole copy is in RAM already: drop the device part
            resident = e.streamed.resident_bytes
            e.streamed.detach()
            e.streamed = None
            self.stats_.evicted("vram", resident)
            self._event(e, "vram", "ram", reason)
            return
        if self.ram_limit < e.size or not self._make_room_ram(e.size - _nbytes(e.host_buffer), exclude=e.key):
            self._remove(e, reason=reason, to="out")
            return
        try:
            new = move_object(e.model, e.buffer, torch.device("cpu"), reuse=e.host_buffer, pin=bool(self.pin_memory),
                              pool=self.host_pool)
        except _OOM_ERRORS as exc:
            log.warning("offload_failed", key=e.key, error=str(exc))
            self._remove(e, reason="oom", to="out")
            return
        e.buffer = e.host_buffer = new
        e.device = torch.device("cpu")
        self.stats_.evicted("vram", e.size)
        self.stats_.moved("ram", e.size)
        self._event(e, "vram", "ram", reason)

    # ---- eviction -----------------------------------------------------------------------------
    def _lru(self, *, vram: bool, exclude: str | None) -> list[CacheEntry]:
        candidates = [e for e in self._entries.values()
                      if not e.locked and e.key != exclude and (self._on_vram(e) or e.streamed is not None) == vram]
        return sorted(candidates, key=lambda e: e.last_used)

    def _vram_room(self, need: int) -> bool:
        if self.vram_used() + self._reserved_vram + need > self.vram_limit:
            return False
        return self._device_free() >= need

    def _device_free(self) -> int:
        """Free device memory, counting blocks PyTorch's allocator holds but no tensor uses."""
        if self.execution_device.type != "cuda":
            return 1 << 62
        free = torch.cuda.mem_get_info(self.execution_device)[0]
        idle = torch.cuda.memory_reserved(self.execution_device) - torch.cuda.memory_allocated(self.execution_device)
        return int(free + max(idle, 0))

    def _make_room_vram(self, need: int, exclude: str | None) -> bool:
        if need > self.vram_limit:
            return False
        for victim in self._lru(vram=True, exclude=exclude):
            if self._vram_room(need):
                return True
            self._offload(victim, reason="lru")
        return self._vram_room(need)

    def _make_room_ram(self, need: int, exclude: str | None) -> bool:
        if self.ram_used() + need <= self.ram_limit:
            return True
        # spare RAM copies of models in VRAM go first: dropping them loses nothing
        spares = sorted((e for e in self._entries.values() if self._on_vram(e) and e.host_buffer is not None
                         and e.key != exclude), key=lambda e: e.last_used)
        for e in spares:
            e.host_buffer = None
            if self.ram_used() + need <= self.ram_limit:
                return True
        for victim in self._lru(vram=False, exclude=exclude):
            self._remove(victim, reason="lru", to="out")
            if self.ram_used() + need <= self.ram_limit:
                return True
        return self.ram_used() + need <= self.ram_limit

    def _remove(self, e: CacheEntry, *, reason: str, to: str) -> None:
        tier = self._tier(e)
        if e.streamed is not None:
            e.streamed.detach()
            e.streamed = None
        self._entries.pop(e.key, None)
        self.stats_.evicted(tier, e.size)
        self._event(e, tier, to, reason)

    def _evict_idle_locked(self) -> None:
        if self.keep_alive <= 0:
            return
        now = self.clock()
        for e in [e for e in self._entries.values() if not e.locked and now - e.last_used > self.keep_alive]:
            self._remove(e, reason="idle", to="out")

    def evict_idle(self) -> list[str]:
        """Drop unlocked models idle for longer than ``keep_alive`` seconds; returns their keys."""
        with self._lock:
            before = set(self._entries)
            self._evict_idle_locked()
            gone = sorted(before - set(self._entries))
            events = self._take_events()
        self._emit(events)
        return gone

    def drop_model(self, model_key: str) -> list[str]:
        """Drop every cached part of a model (all submodels); locked parts stay. Returns dropped keys."""
        with self._lock:
            victims = [e for e in self._entries.values()
                       if (e.model_key == model_key or e.key == model_key) and not e.locked]
            for e in victims:
                self._remove(e, reason="drop", to="out")
            events = self._take_events()
        self._emit(events)
        return [e.key for e in victims]

    def clear(self) -> list[str]:
        """Drop every unlocked model."""
        with self._lock:
            victims = [e for e in self._entries.values() if not e.locked]
            for e in victims:
                self._remove(e, reason="clear", to="out")
            events = self._take_events()
        self._emit(events)
        if self.execution_device.type == "cuda":
            torch.cuda.empty_cache()
        return [e.key for e in victims]

    # ---- events ---------------------------------------------------------------------------
    def _tier(self, e: CacheEntry) -> str:
        return "vram" if self._on_vram(e) else "partial" if e.streamed is not None else "ram"

    def _event(self, e: CacheEntry, src: str, dst: str, reason: str) -> None:
        self._events.append(("cache_evicted", {"key": e.key, "model_key": e.model_key, "submodel": e.submodel,
                                               "bytes": e.size, "from": src, "to": dst, "reason": reason}))

    def _take_events(self) -> list[tuple[str, dict[str, Any]]]:
        events, self._events = self._events, []
        return events

    def _emit(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        for kind, payload in events:
            log.info(kind, **payload)
            if self.on_event is not None:
                try:
                    self.on_event(kind, payload)
                except Exception as exc:  # noqa: BLE001 - a subscriber's code may raise anything; the cache goes on
                    log.warning("cache_event_sink_failed", error=str(exc))


class ModelLocker:
    """The spec's ``ModelInfo.context``: locks a cached model on the execution device for a ``with`` block
    (re-entrant, counted)."""

    def __init__(self, cache: ModelCache, key: str) -> None:
        self.cache = cache
        self.key = key

    def lock(self) -> Any:
        return self.cache.lock(self.key)

    def unlock(self) -> None:
        self.cache.unlock(self.key)

    def __enter__(self) -> Any:
        return self.lock()

    def __exit__(self, *exc: object) -> None:
        self.unlock()


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel()


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
