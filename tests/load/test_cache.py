"""The RAM cache on the CPU: LRU order, locks, limits, drop/clear/idle, stats, events, concurrency,
and whole-object moves into one flat buffer. (The VRAM tier runs the same code on a CUDA device:
see tests/bench/bench_load.py --device cuda.)"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from modelbus.services.load import Loaded, ModelCache, ModelTooLargeError
from modelbus.services.load.tensors import move_object, object_nbytes, tensor_slots

KB = 1000


def _linear(n_bytes: int) -> Any:
    def load(device: torch.device) -> Loaded:
        return Loaded(torch.nn.Linear(n_bytes // 4, 1, bias=False).to(device))
    return load


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0  # every reading is a later moment: LRU order is unambiguous
        return self.now


@pytest.fixture()
def events() -> list[tuple[str, dict[str, Any]]]:
    return []


@pytest.fixture()
def cache(events: list[tuple[str, dict[str, Any]]]) -> ModelCache:
    return ModelCache(ram_limit=3 * KB, clock=Clock(), on_event=lambda k, p: events.append((k, p)))


def test_size_is_parameters_and_buffers() -> None:
    m = torch.nn.BatchNorm1d(10)  # 2x10 params + 2x10 buffers (fp32) + 1 int64 counter
    assert object_nbytes(m) == 40 * 4 + 8
    assert object_nbytes({"a": torch.zeros(3, dtype=torch.float16), "b": "not a tensor"}) == 6


def test_lru_evicts_least_recently_used(cache: ModelCache, events: list[Any]) -> None:
    for key in "abc":
        cache.get_or_load(key, _linear(KB), size_hint=KB)
    cache.get_or_load("a", _linear(KB))  # a becomes most recent: b is now the oldest
    cache.get_or_load("d", _linear(KB), size_hint=KB)
    assert [e.key for e in cache.contents()] == ["d", "a", "c"]
    assert events == [("cache_evicted", {"key": "b", "model_key": "b", "submodel": None, "bytes": KB,
                                         "from": "ram", "to": "out", "reason": "lru"})]
    stats = cache.stats()
    assert (stats.ram.hits, stats.ram.misses, stats.ram.evictions, stats.ram.used) == (1, 4, 1, 3 * KB)


def test_hit_returns_the_same_object(cache: ModelCache) -> None:
    first, hit1 = cache.get_or_load("a", _linear(KB))
    second, hit2 = cache.get_or_load("a", _linear(KB))
    assert (hit1, hit2) == (False, True) and first.model is second.model


def test_locked_model_survives_pressure(cache: ModelCache) -> None:
    cache.get_or_load("a", _linear(KB))
    with cache.locker("a") as model:
        for key in "bcdef":
            cache.get_or_load(key, _linear(KB), size_hint=KB)
        assert "a" in cache and cache.get("a").model is model  # type: ignore[union-attr]
        assert cache.drop_model("a") == [] and cache.clear() != [] and "a" in cache
    assert cache.drop_model("a") == ["a"]


def test_full_of_locked_models_refuses_clearly(cache: ModelCache) -> None:
    for key in "abc":
        cache.get_or_load(key, _linear(KB))
        cache.lock(key)
    with pytest.raises(ModelTooLargeError, match="locked"):
        cache.get_or_load("d", _linear(KB), size_hint=KB)
    assert "d" not in cache and len(cache) == 3


def test_too_large_is_refused_before_and_after_loading(cache: ModelCache) -> None:
    calls = []
    with pytest.raises(ModelTooLargeError, match="MODELBUS_RAM_CACHE_SIZE"):
        cache.get_or_load("big", lambda d: calls.append(d) or Loaded(None), size_hint=10 * KB)
    assert calls == []  # refused from the size hint: nothing was loaded
    with pytest.raises(ModelTooLargeError):
        cache.get_or_load("big", _linear(10 * KB))  # no hint: refused after measuring
    assert "big" not in cache
    cache.get_or_load("ok", _linear(KB))  # and the cache still works


def test_drop_model_drops_every_submodel(cache: ModelCache, events: list[Any]) -> None:
    cache.get_or_load("m:unet", _linear(KB), model_key="m", submodel="unet")
    cache.get_or_load("m:vae", _linear(KB), model_key="m", submodel="vae")
    cache.get_or_load("other", _linear(KB))
    assert sorted(cache.drop_model("m")) == ["m:unet", "m:vae"]
    assert [e.key for e in cache.contents()] == ["other"]
    assert {p["reason"] for _, p in events} == {"drop"}


def test_idle_models_leave_after_keep_alive() -> None:
    now = [0.0]
    cache = ModelCache(ram_limit=10 * KB, keep_alive=5.0, clock=lambda: now[0])
    cache.get_or_load("a", _linear(KB))
    cache.get_or_load("b", _linear(KB))
    cache.lock("b")
    now[0] = 4.0
    assert cache.evict_idle() == []
    now[0] = 10.0
    assert cache.evict_idle() == ["a"]  # b is locked: it stays however idle
    cache.unlock("b")
    now[0] = 20.0
    cache.get_or_load("c", _linear(KB))  # every get sweeps idle ones too
    assert [e.key for e in cache.contents()] == ["c"]


def test_concurrent_requests_load_once(cache: ModelCache) -> None:
    loads = []
    gate = threading.Event()

    def slow(device: torch.device) -> Loaded:
        loads.append(threading.get_ident())
        gate.wait(5)
        return _linear(KB)(device)

    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_load("a", slow))) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join(10)
    assert len(loads) == 1 and len(results) == 8
    assert len({id(entry.model) for entry, _ in results}) == 1
    assert sorted(hit for _, hit in results) == [False] + [True] * 7


def test_failed_load_leaves_no_entry_and_can_be_retried(cache: ModelCache) -> None:
    def broken(device: torch.device) -> Loaded:
        raise OSError("disk on fire")
    with pytest.raises(OSError):
        cache.get_or_load("a", broken)
    assert "a" not in cache
    entry, hit = cache.get_or_load("a", _linear(KB))
    assert not hit and entry.size == KB


def test_move_packs_into_one_buffer_and_keeps_tied_weights() -> None:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 4))
    m[2].weight = torch.nn.Parameter(torch.randn(4, 3))
    shared = torch.nn.Linear(4, 4)
    m.append(shared)
    m.append(shared)  # the same module twice: one slot
    before = {k: v.clone() for k, v in m.state_dict().items()}
    buffer = move_object(m, None, torch.device("cpu"))
    assert buffer is not None
    for slot in tensor_slots(m):
        assert buffer.data_ptr() <= slot.tensor.data_ptr() < buffer.data_ptr() + buffer.numel()
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert m[3].weight is m[4].weight
    # a second move copies the buffer whole and reuses a kept destination of the right size
    kept = torch.empty_like(buffer)
    again = move_object(m, buffer, torch.device("cpu"), reuse=kept)
    assert again is kept and all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_objects_without_tensors_are_cached_at_size_zero(cache: ModelCache) -> None:
    entry, _ = cache.get_or_load("tok", lambda d: Loaded({"vocab": "not tensors"}))
    assert entry.size == 0 and entry.device is None
    assert cache.lock("tok") == {"vocab": "not tensors"}


def test_every_parameter_is_its_own_slot_and_tied_ones_share_one() -> None:
    """Found by a flaky size count: slots keyed by ``id(p.data)``, a fresh alias at each access whose id
    the next parameter's alias could reuse, merged two parameters into one slot (wrong sizes, and a move
    could hand one parameter the other's tensor)."""
    for _ in range(20):
        model = torch.nn.Sequential(*[torch.nn.Linear(3, 3) for _ in range(300)])
        tied = torch.nn.Embedding(5, 3)
        head = torch.nn.Linear(3, 5, bias=False)
        head.weight = tied.weight
        whole = torch.nn.ModuleDict({"body": model, "emb": tied, "head": head})
        slots = tensor_slots(whole)
        assert len(slots) == 600 + 1
        assert object_nbytes(whole) == sum(p.numel() * p.element_size() for p in whole.parameters())
        assert sum(len(s.setters) for s in slots) == 601  # the tied weight: one Parameter, one setter
