"""Worker state: what each worker's heartbeat publishes, and the one way to read it back.

A worker writes its :class:`WorkerState` (host, queues, device, cache limits and contents, last beat) under
``Keys.worker_state(id)`` with a TTL and scores its id by the beat's time in ``Keys.workers``; a worker
whose state has expired is gone. Routing (``services.routing``), the client's worker list and the workers
themselves (``workers.runner``) use these functions and models, never the raw keys or JSON.

State models ignore fields they do not know (a newer worker beside older readers stays routable).
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson
import redis
from pydantic import ConfigDict, Field, ValidationError

from modelbus.events.keys import Keys
from modelbus.events.schema import NamedFields


class _State(NamedFields):
    model_config = ConfigDict(frozen=True, extra="ignore")


class CachedModel(_State):
    """One entry of a worker's model cache."""

    key: str
    model_key: str
    submodel: str | None = None
    bytes: int = 0
    device: str = "cpu"
    tier: str = "ram"
    locked: bool = False
    idle_seconds: float = 0.0
    ram_copy: bool = False
    resident_bytes: int = 0  # bytes on the device; less than ``bytes`` when streamed (tier "partial")


class TierState(_State):
    """One cache tier (RAM or VRAM): its limit, use and counters."""

    # what it holds now
    used: int = 0
    limit: int = 0
    # requests since the worker started
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    # traffic since the worker started
    loads_bytes: int = 0       # loaded from disk into this tier
    moved_in_bytes: int = 0    # moved in from the other tier
    evicted_bytes: int = 0
    load_seconds: float = 0.0


class CacheState(_State):
    ram: TierState = Field(default_factory=TierState)
    vram: TierState = Field(default_factory=TierState)
    vram_free: int = 0
    models: int = 0


class WorkerCache(_State):
    """What a GPU worker adds to its beat: its device, free VRAM, cached models and cache statistics."""

    device: str | None = None
    vram_free: int | None = None
    models: tuple[CachedModel, ...] = ()
    disk_models: tuple[str, ...] = ()  # model keys whose blobs this host's store cache holds (disk affinity)
    stats: CacheState | None = None

    @property
    def cached_bytes(self) -> int:
        return sum(m.bytes for m in self.models)


class WorkerState(WorkerCache):
    """One worker as its last heartbeat described it."""

    id: str
    host: str
    pid: int
    queues: tuple[str, ...]
    time: float  # the last beat (Unix time)
    state_error: str | None = None  # the cache could not be described at this beat

    def serves(self, queue: str) -> bool:
        return queue in self.queues

    def holds(self, model_key: str) -> bool:
        return any(m.model_key == model_key for m in self.models)


class WorkerInfo(WorkerCache):
    """A registered worker as the client lists it: its last state's fields (empty once the state expired),
    the time of its last beat, and whether it is alive."""

    id: str
    alive: bool
    last_heartbeat: float
    queues: tuple[str, ...] = ()
    host: str | None = None
    pid: int | None = None
    time: float | None = None
    state_error: str | None = None


def publish_worker_state(connection: redis.Redis[bytes], keys: Keys, state: WorkerState, ttl: float) -> None:
    """Write one beat: the state (expiring after ``ttl`` seconds) and the id's score in the worker index."""
    pipe = connection.pipeline()
    pipe.set(keys.worker_state(state.id), state.model_dump_json().encode(), px=int(ttl * 1000))
    pipe.zadd(keys.workers, {state.id: state.time})
    pipe.execute()


def remove_worker_state(connection: redis.Redis[bytes], keys: Keys, worker_id: str) -> None:
    pipe = connection.pipeline()
    pipe.delete(keys.worker_state(worker_id))
    pipe.zrem(keys.workers, worker_id)
    pipe.execute()


def worker_alive(connection: redis.Redis[bytes], keys: Keys, worker_id: str) -> bool:
    return bool(connection.exists(keys.worker_state(worker_id)))


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _parse(raw: bytes | str | None) -> WorkerState | None:
    """A stored state, or None when it expired or cannot be read (a reader skips such a worker)."""
    if raw is None:
        return None
    try:
        return WorkerState.model_validate(orjson.loads(raw))
    except (orjson.JSONDecodeError, ValidationError):
        return None


def _registered(connection: redis.Redis[bytes], keys: Keys) -> list[tuple[str, float]]:
    """Registered worker ids with their last beat, newest first."""
    return [(_text(raw), float(score)) for raw, score in connection.zrevrange(keys.workers, 0, -1, withscores=True)]


def _states(connection: redis.Redis[bytes], keys: Keys, ids: Iterable[str]) -> list[WorkerState | None]:
    ids = list(ids)
    return [_parse(raw) for raw in connection.mget([keys.worker_state(i) for i in ids])] if ids else []


def read_worker_states(connection: redis.Redis[bytes], keys: Keys) -> list[WorkerState]:
    """The live workers (whose state has not expired), newest beat first; expired ids leave the index."""
    beats = _registered(connection, keys)
    states = _states(connection, keys, (i for i, _ in beats))
    stale = [i for (i, _), s in zip(beats, states, strict=True) if s is None]
    if stale:
        connection.zrem(keys.workers, *stale)
    return [s for s in states if s is not None]


def list_workers(connection: redis.Redis[bytes], keys: Keys, now: float, alive_seconds: float) -> list[WorkerInfo]:
    """Every registered worker, oldest beat first: alive while its state lives and its beat is recent."""
    beats = list(reversed(_registered(connection, keys)))
    states = _states(connection, keys, (i for i, _ in beats))
    return [WorkerInfo(**({"id": i} if s is None else dict(s)), last_heartbeat=beat,
                       alive=s is not None and now - beat < alive_seconds)
            for (i, beat), s in zip(beats, states, strict=True)]
