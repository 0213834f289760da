"""A pool of pinned host memory for the RAM tier, pinned once and reused.

Pinning fresh host memory runs at about 1 GB/s (the kernel faults in and locks every page), so a
model's first VRAM -> RAM offload into new pinned memory crawls while later ones, into memory
already pinned, run at the bus's speed. The pool takes one region the size of the RAM cache's
limit when the cache starts (in a background thread: the worker answers meanwhile), registers it
with CUDA, and hands out pieces of it:

- a piece is a CPU ``uint8`` tensor with its own storage (a numpy view of the region), so views of
  it keep it alive like any tensor; when the last one dies its range goes back to the pool;
- a range freed while a copy from it may still be in flight is reused only after the device
  finished its queued work (one stream synchronisation before the first reuse);
- no room (the region is full or fragmented, or not pinned yet): ``take`` returns None and the
  caller allocates as before. Pinning is a speed-up, never a requirement: without CUDA, or when the
  region cannot be registered, the pool stays empty and unused.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from typing import Any

import numpy as np
import torch

from modelbus.events.logs import get_logger

log = get_logger(__name__)

GRAIN = 2 << 20  # pieces start on 2 MiB boundaries (huge-page friendly, few free-list entries)


def _round(n: int) -> int:
    return (max(n, 1) + GRAIN - 1) // GRAIN * GRAIN


class PinnedPool:
    """First-fit suballocation of one host region (pinned when ``pin`` and CUDA are there)."""

    def __init__(self, capacity: int, *, pin: bool = True, device: torch.device | None = None,
                 background: bool = True) -> None:
        self.capacity = _round(capacity) if capacity > 0 else 0
        self.pin = pin and torch.cuda.is_available()
        self.device = device
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._region: np.ndarray[Any, Any] | None = None
        self._free: list[tuple[int, int]] = []  # (offset, length), sorted by offset, coalesced
        self._dirty = False                      # a range came back since the device last drained
        self.pinned = False
        self.in_use = 0
        if self.capacity == 0:
            self._ready.set()
        elif background:
            threading.Thread(target=self._reserve, name="modelbus-pin", daemon=True).start()
        else:
            self._reserve()

    def _reserve(self) -> None:
        try:
            region = np.empty(self.capacity, dtype=np.uint8)
            region[::4096] = 0  # fault the pages in now, not during the first offload
            if self.pin:
                err = torch.cuda.cudart().cudaHostRegister(region.ctypes.data, self.capacity, 1)  # portable
                if int(err) != 0:
                    log.warning("pinned_pool_not_pinned", bytes=self.capacity, error=int(err))
                    return
                self.pinned = True
                self._finalizer = weakref.finalize(self, _unregister, region)
            with self._lock:
                self._region = region
                self._free = [(0, self.capacity)]
            log.info("pinned_pool_ready", bytes=self.capacity, pinned=self.pinned)
        except (MemoryError, RuntimeError) as exc:
            log.warning("pinned_pool_failed", bytes=self.capacity, error=str(exc))
        finally:
            self._ready.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    @property
    def available(self) -> int:
        with self._lock:
            return sum(n for _, n in self._free)

    def take(self, nbytes: int) -> torch.Tensor | None:
        """A piece of ``nbytes`` (uint8, CPU), or None when the pool has no such range now."""
        if self._region is None or nbytes <= 0:
            return None
        need = _round(nbytes)
        with self._lock:
            index = next((i for i, (_, n) in enumerate(self._free) if n >= need), None)
            if index is None:
                return None
            off, n = self._free[index]
            if n == need:
                del self._free[index]
            else:
                self._free[index] = (off + need, n - need)
            self.in_use += need
            drain, self._dirty = self._dirty, False
        if drain and self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # a copy from a reused range may still be queued
        piece = self._region[off:off + nbytes]
        weakref.finalize(piece, self._give_back, off, need)
        return torch.from_numpy(piece)

    def _give_back(self, off: int, n: int) -> None:
        with self._lock:
            self.in_use -= n
            self._dirty = True
            i = bisect.bisect(self._free, (off, n))
            self._free.insert(i, (off, n))
            # coalesce with the neighbours
            if i + 1 < len(self._free) and off + n == self._free[i + 1][0]:
                self._free[i] = (off, n + self._free[i + 1][1])
                del self._free[i + 1]
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == off:
                self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
                del self._free[i]

    def owns(self, t: torch.Tensor | None) -> bool:
        if t is None or self._region is None or t.device.type != "cpu":
            return False
        base = self._region.ctypes.data
        return base <= t.data_ptr() < base + self.capacity


def _unregister(region: np.ndarray[Any, Any]) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(region.ctypes.data)
    except RuntimeError:
        pass
