"""What ``/healthz`` answers, probed at most once per ``HEALTH_REFRESH_SECONDS`` and served from memory
in between, so a probe storm (or a load balancer polling every process) costs Redis one round of reads
a second instead of one per request.

The rule: an answer is never older than the refresh interval; one probe runs at a time (callers that
find the state stale while a probe runs wait for its result instead of starting their own); a failed
or timed-out probe is remembered as "unavailable" for the interval like any other answer. With a
refresh interval of 0 every call probes (the behaviour before the cache, kept for the benchmark).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from modelbus.services.api.schemas import Health, RedisHealth
from modelbus.services.client import ModelBusClient, defaults


@dataclass(frozen=True)
class Snapshot:
    """One probe's answer, serialised once."""

    body: bytes
    available: bool
    workers_alive: int
    at: float  # time.monotonic() of the probe


def probe(client: ModelBusClient) -> Health:
    """Redis round trip, live workers, queue lengths and the quarantine: the state ``/healthz`` reports."""
    latency = client.ping()
    workers, queues = client.workers(), client.queue_lengths()
    served = {q for w in workers for q in w.queues}
    health = Health(status="ok", redis=RedisHealth(ok=True, latency_ms=round(latency * 1000, 3)),
                    workers_alive=len(workers), queues=queues,
                    unserved=sorted(q for q, n in queues.items() if n and q not in served),
                    quarantined=client.quarantine_count())
    if health.workers_alive == 0 or health.unserved or health.quarantined:
        health.status = "degraded"
    return health


class HealthState:
    def __init__(self, client: ModelBusClient, refresh_seconds: float = defaults.HEALTH_REFRESH_SECONDS) -> None:
        self.client = client
        self.refresh_seconds = refresh_seconds
        self._snapshot: Snapshot | None = None
        self._lock = threading.Lock()

    def fresh(self) -> Snapshot | None:
        """The remembered answer while it is younger than the refresh interval (no I/O: safe on the loop)."""
        snapshot = self._snapshot
        if snapshot is not None and time.monotonic() - snapshot.at < self.refresh_seconds:
            return snapshot
        return None

    def refresh(self) -> Snapshot:
        """Probe (blocking: run it in a thread), unless another caller's probe has just answered."""
        if self.refresh_seconds <= 0:
            return self._remember(probe(self.client))
        with self._lock:
            return self.fresh() or self._remember(probe(self.client))

    def failed(self, error: str) -> Snapshot:
        """Remember that the probe failed or timed out: unavailable until the next refresh."""
        return self._remember(Health(status="unavailable", redis=RedisHealth(ok=False, error=error), workers_alive=0),
                              available=False)

    def _remember(self, health: Health, available: bool = True) -> Snapshot:
        snapshot = Snapshot(health.model_dump_json().encode(), available, health.workers_alive, time.monotonic())
        self._snapshot = snapshot
        return snapshot
