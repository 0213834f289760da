"""Recycled host memory for CPU loads: the buffers of models that are gone, kept for the next load.

A CPU load writes a whole model (an fp32 SD-1.5 UNet: 3.4 GB) into memory. Fresh memory from the
OS is zeroed and faulted in page by page as the load first writes it, which cost more than reading
the file from the page cache (the half-width UNet's 0.9 GB: 0.39 s of a 0.45 s load on the 2-core
dev VM). Here a load's buffer comes from a pool of buffers that earlier loads used and freed, whose
pages are still mapped; a new buffer is an anonymous mapping advised to use huge pages (one fault
per 2 MiB instead of per 4 KiB).

The rule this module keeps: **a buffer is back in the pool only once no tensor uses it.** Each
:meth:`HostMemory.take` hands out a tensor whose storage holds a numpy view made for that one load
(its *lease*); torch drops the lease when the storage itself is freed, which happens only after the
last tensor, view, parameter or ``.numpy()`` array of it is gone (the cache's eviction drops its
references; a caller that kept a tensor keeps the whole buffer). The lease's finalizer gives the
buffer back. Nothing else can return a buffer, so recycled memory never aliases a live tensor.

Bounds: free buffers are kept up to ``MODELBUS_CPU_RECYCLE_MB`` MiB in all (default 4096; the
oldest go first; ``0`` keeps none) and are unmapped after ``MODELBUS_CPU_RECYCLE_IDLE_S`` seconds
unused (default 60), by a daemon thread that runs only while the pool holds something. A forked
child starts with an empty pool (its copy of the parent's free pages would be copied on write,
which is no cheaper than fresh ones).
"""

from __future__ import annotations

import mmap
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modelbus.events.errors import InvalidInput
from modelbus.events.logs import get_logger

log = get_logger(__name__)

GRAIN = 2 << 20          # new buffers are whole huge pages
_SLACK = 1.25            # a free buffer up to this much larger than asked for is used, not a new one
_HUGE = getattr(mmap, "MADV_HUGEPAGE", None)
RECYCLE_MB_ENV = "MODELBUS_CPU_RECYCLE_MB"
RECYCLE_IDLE_ENV = "MODELBUS_CPU_RECYCLE_IDLE_S"


class RecycleSettingError(InvalidInput, ValueError):
    """A recycling setting is not a number it can use; the message names the variable and the value."""


@dataclass(eq=False)
class _Block:
    """One anonymous mapping and the uint8 array over it (the pool's own reference)."""

    size: int
    array: np.ndarray[Any, np.dtype[np.uint8]]
    returned_at: float = 0.0


class HostMemory:
    """A pool of host buffers for CPU loads (see the module docstring)."""

    _lock: threading.RLock
    _wake: threading.Condition
    _busy: bool
    _pending: list[_Block]
    _free: list[_Block]           # oldest returned first
    _leased_bytes: int
    _reaper: threading.Thread | None

    def __init__(self, max_bytes: int, idle_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes < 0 or idle_seconds < 0:
            raise ValueError(f"max_bytes and idle_seconds must not be negative: {max_bytes}, {idle_seconds}")
        self.max_bytes = max_bytes
        self.idle_seconds = idle_seconds
        self.clock = clock
        self._after_fork()
        self.reused = 0   # takes served from the pool
        self.mapped = 0   # takes that mapped a new buffer

    # ---- what callers use ---------------------------------------------------------------------
    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 CPU tensor of ``nbytes`` (contents undefined), a recycled buffer when one fits."""
        want = max(nbytes, 1)
        with self._inside():
            block = self._best_fit(want)
            if block is not None:
                self._free.remove(block)
                self.reused += 1
            else:
                self.mapped += 1
            self._leased_bytes += block.size if block is not None else 0
        if block is None:
            block = _map(-(-want // GRAIN) * GRAIN)
            with self._inside():
                self._leased_bytes += block.size
        lease = block.array[:want]  # a view of its own: torch holds it until the storage is freed
        weakref.finalize(lease, self._give_back, block).atexit = False
        return torch.from_numpy(lease)[:nbytes]

    @property
    def free_bytes(self) -> int:
        with self._inside():
            return sum(b.size for b in self._free)

    @property
    def leased_bytes(self) -> int:
        """Bytes of buffers handed out whose storage is still alive."""
        with self._inside():
            return self._leased_bytes

    def release_idle(self) -> int:
        """Unmap the free buffers unused for ``idle_seconds``; returns the bytes released."""
        with self._inside():
            return self._drop(self._idle_blocks(self.clock()))

    def set_bounds(self, max_bytes: int, idle_seconds: float) -> None:
        """New bounds; free buffers over them go now."""
        if max_bytes < 0 or idle_seconds < 0:
            raise ValueError(f"max_bytes and idle_seconds must not be negative: {max_bytes}, {idle_seconds}")
        with self._inside():
            self.max_bytes, self.idle_seconds = max_bytes, idle_seconds
            self._drop(self._over_cap(self.max_bytes) if idle_seconds > 0 else list(self._free))
            if self._reaper is not None:
                self._wake.notify()

    def clear(self) -> int:
        """Unmap every free buffer now (leased ones come back later as usual)."""
        with self._inside():
            return self._drop(list(self._free))

    # ---- inside ---------------------------------------------------------------------------------
    @contextmanager
    def _inside(self) -> Iterator[None]:
        """The pool's lock, held by this thread's pool work. A lease whose storage dies meanwhile on
        this same thread (a gc pass run by an allocation in here) is queued and returned on the way
        out instead of entering the pool half-way through a change."""
        with self._lock:
            self._busy = True
            try:
                yield
            finally:
                try:
                    while self._pending:
                        self._return(self._pending.pop(0))
                finally:
                    self._busy = False

    def _give_back(self, block: _Block) -> None:
        """The lease's storage is gone: the buffer is free (called by the finalizer, any thread)."""
        with self._lock:  # re-entrant: the same thread may be inside the pool already
            if self._busy:
                self._pending.append(block)
                return
            with self._inside():
                self._return(block)

    def _return(self, block: _Block) -> None:
        self._leased_bytes -= block.size
        if block.size > self.max_bytes or self.idle_seconds == 0:
            self._drop([block], listed=False)
            return
        block.returned_at = self.clock()
        self._free.append(block)
        self._drop(self._over_cap(self.max_bytes))  # the one just returned is last and fits alone
        self._start_reaper()

    def _over_cap(self, cap: int) -> list[_Block]:
        """The oldest free buffers whose release brings the free bytes within ``cap``."""
        total = sum(b.size for b in self._free)
        over: list[_Block] = []
        for old in self._free:
            if total <= cap:
                break
            over.append(old)
            total -= old.size
        return over

    def _best_fit(self, want: int) -> _Block | None:
        fits = [b for b in self._free if want <= b.size <= max(want * _SLACK, want + GRAIN)]
        return min(fits, key=lambda b: b.size) if fits else None

    def _idle_blocks(self, now: float) -> list[_Block]:
        return [b for b in self._free if now - b.returned_at >= self.idle_seconds]

    def _drop(self, blocks: list[_Block], listed: bool = True) -> int:
        released = 0
        for b in blocks:
            if listed:
                self._free.remove(b)
            released += b.size
            b.array = _EMPTY  # the last reference to the mapping: unmapped now
        if released:
            log.debug("host_memory_released", bytes=released, free=len(self._free))
        return released

    def _start_reaper(self) -> None:
        if self._reaper is not None:
            self._wake.notify()
            return
        self._reaper = threading.Thread(target=self._reap, name="modelbus-host-memory", daemon=True)
        self._reaper.start()

    def _reap(self) -> None:
        with self._lock:
            while True:
                with self._inside():
                    now = self.clock()
                    self._drop(self._idle_blocks(now))
                    if not self._free:
                        self._reaper = None
                        return
                    wait = min(b.returned_at for b in self._free) + self.idle_seconds - now
                self._wake.wait(max(wait, 0.01))

    def _after_fork(self) -> None:
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._busy = False
        self._pending = []
        self._free = []
        self._leased_bytes = 0
        self._reaper = None


_EMPTY: np.ndarray[Any, np.dtype[np.uint8]] = np.empty(0, dtype=np.uint8)


def _map(size: int) -> _Block:
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    if _HUGE is not None:
        try:
            mapping.madvise(_HUGE)
        except OSError:
            pass  # huge pages off or unsupported: 4 KiB pages, still recycled
    return _Block(size, np.frombuffer(mapping, dtype=np.uint8))


def _setting(name: str, default: str) -> float:
    raw = os.environ.get(name, default)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # (NaN too)
        raise RecycleSettingError(f"{name} must be a number >= 0, got {raw!r}")
    return value


_default: HostMemory | None = None
_default_lock = threading.Lock()


def host_memory() -> HostMemory:
    """The process's pool; made on first use from ``MODELBUS_CPU_RECYCLE_MB`` and ``..._IDLE_S`` when
    no :func:`configure` came first (a load outside the service: the benchmarks, a script)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = HostMemory(int(_setting(RECYCLE_MB_ENV, "4096") * (1 << 20)), _setting(RECYCLE_IDLE_ENV, "60"))
        return _default


def configure(max_bytes: int, idle_seconds: float) -> HostMemory:
    """Set the process's pool's bounds (``ModelLoadService`` does, from its config's
    ``cpu_recycle_mb`` and ``cpu_recycle_idle_s``)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = HostMemory(max_bytes, idle_seconds)
        else:
            _default.set_bounds(max_bytes, idle_seconds)
        return _default


def _reset_in_child() -> None:
    global _default_lock
    _default_lock = threading.Lock()
    if _default is not None:
        _default._after_fork()


os.register_at_fork(after_in_child=_reset_in_child)
