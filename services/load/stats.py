"""Cache statistics and the description of cached entries (plain data, JSON-ready)."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    loads_bytes: int = 0       # bytes loaded from disk into this tier
    moved_in_bytes: int = 0    # bytes moved into this tier from the other one
    evicted_bytes: int = 0
    load_seconds: float = 0.0
    used: int = 0
    limit: int = 0


@dataclass
class CacheStats:
    ram: TierStats = field(default_factory=TierStats)
    vram: TierStats = field(default_factory=TierStats)
    vram_free: int = 0
    models: int = 0

    def tier(self, name: str) -> TierStats:
        return self.vram if name == "vram" else self.ram

    def hit(self, tier: str) -> None:
        self.tier(tier).hits += 1

    def miss(self, tier: str, nbytes: int, seconds: float) -> None:
        t = self.tier(tier)
        t.misses += 1
        t.loads_bytes += nbytes
        t.load_seconds += seconds

    def evicted(self, tier: str, nbytes: int) -> None:
        t = self.tier(tier)
        t.evictions += 1
        t.evicted_bytes += nbytes

    def moved(self, tier: str, nbytes: int) -> None:
        self.tier(tier).moved_in_bytes += nbytes

    @property
    def hits(self) -> int:
        return self.ram.hits + self.vram.hits

    @property
    def misses(self) -> int:
        return self.ram.misses + self.vram.misses

    @property
    def evictions(self) -> int:
        return self.ram.evictions + self.vram.evictions

    def snapshot(self, *, ram_used: int, ram_limit: int, vram_used: int, vram_limit: int, vram_free: int,
                 models: int) -> CacheStats:
        snap = copy.deepcopy(self)
        snap.ram.used, snap.ram.limit = ram_used, ram_limit
        snap.vram.used, snap.vram.limit = vram_used, vram_limit
        snap.vram_free, snap.models = vram_free, models
        return snap

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EntryInfo:
    key: str
    model_key: str
    submodel: str | None
    bytes: int
    device: str
    tier: str
    locked: bool
    idle_seconds: float
    ram_copy: bool
    resident_bytes: int = 0  # on the execution device: all of it in VRAM, a part when streamed (tier "partial")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
