"""Worker state has one owner (events.workers): what a heartbeat publishes is what routing and the client
read, typed; an expired or unreadable state is a worker that is gone, never a crash."""

from __future__ import annotations

import time

from modelbus.events.store import RedisEventStore
from modelbus.events.workers import (
    CachedModel,
    WorkerState,
    list_workers,
    publish_worker_state,
    read_worker_states,
    remove_worker_state,
)
from modelbus.services.routing import choose_gpu_worker, worker_states


def _state(worker_id: str, *, models: tuple[str, ...] = (), vram_free: int | None = None,
           queues: tuple[str, ...] = ("gpu",), beat: float | None = None, disk: tuple[str, ...] = ()) -> WorkerState:
    return WorkerState(id=worker_id, host="h", pid=1, queues=queues, time=beat or time.time(), device="cpu",
                       vram_free=vram_free, disk_models=disk, models=tuple(CachedModel(key=f"{m}:unet", model_key=m, bytes=10)
                                                         for m in models))


def test_what_is_published_is_read_back_typed(event_store: RedisEventStore) -> None:
    client, keys = event_store.client, event_store.keys
    publish_worker_state(client, keys, _state("old", beat=time.time() - 5), ttl=30)
    publish_worker_state(client, keys, _state("new", models=("k1",), vram_free=5), ttl=30)
    states = read_worker_states(client, keys)
    assert [s.id for s in states] == ["new", "old"]  # newest beat first
    assert states[0].holds("k1") and not states[1].holds("k1") and states[0].cached_bytes == 10
    assert states == worker_states(client, event_store.namespace)


def test_routing_prefers_the_holder_then_the_disk_then_free_vram(event_store: RedisEventStore) -> None:
    client, keys = event_store.client, event_store.keys
    publish_worker_state(client, keys, _state("roomy", vram_free=100), ttl=30)
    publish_worker_state(client, keys, _state("disk", vram_free=2, disk=("k3",)), ttl=30)
    publish_worker_state(client, keys, _state("holder", models=("k1",), vram_free=1), ttl=30)
    publish_worker_state(client, keys, _state("cpu-only", queues=("install",), vram_free=1000), ttl=30)
    states = read_worker_states(client, keys)
    assert choose_gpu_worker(states, "k1") == "holder"
    assert choose_gpu_worker(states, "k2") == "roomy"
    assert choose_gpu_worker(states, "k3") == "disk"


def test_expired_or_unreadable_states_are_workers_gone(event_store: RedisEventStore) -> None:
    client, keys = event_store.client, event_store.keys
    publish_worker_state(client, keys, _state("live"), ttl=30)
    publish_worker_state(client, keys, _state("broken"), ttl=30)
    client.set(keys.worker_state("broken"), b'{"id": "broken", "queues": 7}')
    client.zadd(keys.workers, {"expired": time.time() - 60})  # its state key is long gone
    listed = {w.id: w for w in list_workers(client, keys, time.time(), alive_seconds=30)}
    assert listed["live"].alive and listed["live"].queues == ("gpu",)
    assert not listed["broken"].alive and not listed["expired"].alive and listed["expired"].queues == ()
    assert [s.id for s in read_worker_states(client, keys)] == ["live"]
    assert client.zscore(keys.workers, "expired") is None  # the reader pruned the index
    remove_worker_state(client, keys, "live")
    assert read_worker_states(client, keys) == []


def test_bitsandbytes_loads_go_to_a_cuda_worker_where_one_is_alive(event_store: RedisEventStore) -> None:
    """A bnb record prefers a CUDA worker over a roomier CPU worker, even one that holds it; with no CUDA
    worker alive it goes to a CPU worker (bitsandbytes' CPU backend, or its refusal there)."""
    from modelbus.services.records.enums import ModelFormat
    from modelbus.services.routing import device_wanted

    client, keys = event_store.client, event_store.keys
    publish_worker_state(client, keys, _state("cpu-roomy", vram_free=1000, models=("bnb",)), ttl=30)
    cuda = _state("cuda-small", vram_free=1).model_copy(update={"device": "cuda:0"})
    publish_worker_state(client, keys, cuda, ttl=30)
    states = read_worker_states(client, keys)
    assert device_wanted(ModelFormat.BnbQuantizedNF4) == device_wanted("bnb_quantized_int8b") == "cuda"
    assert device_wanted(ModelFormat.Checkpoint) is None and device_wanted(None) is None
    assert choose_gpu_worker(states, "bnb", device=device_wanted(ModelFormat.BnbQuantizedNF4)) == "cuda-small"
    assert choose_gpu_worker(states, "bnb") == "cpu-roomy"  # any other format: the holder, as always
    assert choose_gpu_worker(states, "other", device=None) == "cpu-roomy"  # the most free VRAM
    assert choose_gpu_worker(states, "bnb", "cpu-roomy", device="cuda") == "cpu-roomy"  # a named worker is obeyed
    cpu_only = [s for s in states if s.id == "cpu-roomy"]
    assert choose_gpu_worker(cpu_only, "bnb", device="cuda") == "cpu-roomy"
