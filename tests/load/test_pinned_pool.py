"""The pinned host pool: pieces of one region, given back when their last view dies, reused.

On a machine without CUDA the region is plain memory (``pin`` has no effect): the bookkeeping is
the same, and that is what these tests check; the speed is measured by bench_load on a GPU."""

from __future__ import annotations

import gc
import itertools

import torch

from modelbus.services.load.cache import ModelCache
from modelbus.services.load.pinned import GRAIN, PinnedPool
from modelbus.services.load.tensors import move_object, tensor_slots


def _pool(mib: int) -> PinnedPool:
    pool = PinnedPool(mib << 20, pin=True, background=False)
    assert pool.wait_ready(5)
    return pool


def test_pieces_come_back_when_their_last_view_dies() -> None:
    pool = _pool(16)
    a = pool.take(5 << 20)
    assert a is not None and a.numel() == 5 << 20 and pool.owns(a)
    view = a[100:200].view(torch.int32)  # a view keeps the piece taken
    del a
    gc.collect()
    assert pool.in_use == 6 << 20
    b = pool.take(10 << 20)
    assert b is not None and pool.take(1 << 20) is None  # 6 + 10 of 16 MiB: no 2 MiB range left
    del view, b
    gc.collect()
    assert pool.in_use == 0 and pool.available == 16 << 20
    whole = pool.take(16 << 20)  # the freed ranges coalesced into one again
    assert whole is not None


def test_pieces_do_not_overlap_and_keep_their_data() -> None:
    pool = _pool(32)
    pieces = [pool.take((i + 1) * GRAIN - 7) for i in range(4)]
    assert all(p is not None for p in pieces)
    for i, p in enumerate(pieces):
        assert p is not None
        p.fill_(i + 1)
    for i, p in enumerate(pieces):
        assert p is not None and bool((p == i + 1).all())
    spans = sorted((p.data_ptr(), p.data_ptr() + p.numel()) for p in pieces if p is not None)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))


def test_a_full_pool_falls_back_and_an_empty_one_is_never_used() -> None:
    pool = _pool(4)
    model = torch.nn.Linear(1024, 1024)  # 4 MiB of weights: more than the pool once aligned
    new = move_object(model, None, torch.device("cpu"), pin=True, pool=pool)
    assert new is not None and not pool.owns(new)
    small = torch.nn.Linear(64, 64)
    before = {k: v.clone() for k, v in small.state_dict().items()}
    got = move_object(small, None, torch.device("cpu"), pin=True, pool=pool)
    assert pool.owns(got)
    assert all(pool.owns(s.tensor) for s in tensor_slots(small))
    assert all(torch.equal(v, before[k]) for k, v in small.state_dict().items())
    empty = PinnedPool(0)
    assert empty.take(10) is None


def test_a_cpu_cache_makes_no_pool() -> None:
    cache = ModelCache(execution_device=torch.device("cpu"), ram_limit=1 << 30)
    assert cache.host_pool is None
