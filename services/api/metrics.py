"""Prometheus metrics. Gauges are read from Redis at scrape time (queue lengths, jobs by state, live
workers, their caches); counters follow the activity stream from the API's start (loads with cache
hits and bytes, downloads, every activity kind); the HTTP middleware counts requests and latency.

When the API runs as several processes (``modelbus up`` with ``MODELBUS_API_WORKERS`` > 1 sets
``PROMETHEUS_MULTIPROC_DIR``), the HTTP counters live in prometheus_client's per-process files and a
scrape of any process sums them all; the gauges and activity counters are read from Redis, the same
in every process."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from modelbus.events.logs import get_logger
from modelbus.events.schema import Activity, DownloadCompleted, Event, ModelLoadCompleted
from modelbus.services.client import ClientError, ModelBusClient

log = get_logger(__name__)


class ActivityTally:
    """Counts activity events since it was created; caught up on each scrape (no thread of its own)."""

    def __init__(self, client: ModelBusClient) -> None:
        self.client = client
        self.kinds: Counter[str] = Counter()
        self.loads: Counter[str] = Counter()  # "hit" / "miss"
        self.load_bytes = 0
        self.load_seconds = 0.0
        self.download_bytes = 0
        self._cursor: str | None = None
        self._lock = threading.Lock()

    def catch_up(self) -> None:
        with self._lock:
            store = self.client.store
            if self._cursor is None:
                self._cursor = store.head("activity")
            while batch := store.read(self._cursor, stream="activity"):
                for stored in batch:
                    self._count(stored.event)
                self._cursor = batch[-1].position

    def _count(self, event: Event) -> None:
        if not isinstance(event, Activity):
            return
        self.kinds[event.kind] += 1
        if isinstance(event, ModelLoadCompleted):
            self.loads["hit" if event.payload.cache_hit else "miss"] += 1
            self.load_bytes += event.payload.bytes
            self.load_seconds += event.payload.seconds
        elif isinstance(event, DownloadCompleted):
            self.download_bytes += event.payload.total_bytes or event.payload.bytes


class ModelBusCollector(Collector):
    def __init__(self, client: ModelBusClient) -> None:
        self.client = client
        self.tally = ActivityTally(client)

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("modelbus_redis_up", "1 when Redis answered this scrape")
        try:
            families = list(self._families())
        except Exception as exc:  # noqa: BLE001 - a scrape reports Redis down, it does not fail
            log.warning("metrics_scrape_failed", error=str(exc))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterator[Any]:
        queues = GaugeMetricFamily("modelbus_queue_length", "jobs waiting per queue", labels=["queue"])
        for name, length in self.client.queue_lengths().items():
            queues.add_metric([name], length)
        yield queues
        workers = self.client.workers()
        yield GaugeMetricFamily("modelbus_workers_alive", "workers with a fresh heartbeat", value=len(workers))
        cached = GaugeMetricFamily("modelbus_cache_models", "models in a worker's cache", labels=["worker"])
        cached_bytes = GaugeMetricFamily("modelbus_cache_bytes", "bytes in a worker's cache", labels=["worker"])
        for w in workers:
            cached.add_metric([w.id], len(w.models))
            cached_bytes.add_metric([w.id], w.cached_bytes)
        yield cached
        yield cached_bytes
        try:
            jobs = self.client.jobs()
        except ClientError:
            jobs = None
        if jobs is not None:
            states = GaugeMetricFamily("modelbus_install_jobs", "install jobs by state", labels=["state"])
            for state, n in sorted(Counter(j.state for j in jobs).items()):
                states.add_metric([state], n)
            yield states
        yield CounterMetricFamily("modelbus_quarantined_events", "log entries refused by every reader",
                                  value=self.client.quarantine_count())
        self.tally.catch_up()
        t = self.tally
        loads = CounterMetricFamily("modelbus_model_loads", "model loads by cache outcome", labels=["cache"])
        for outcome in ("hit", "miss"):
            loads.add_metric([outcome], t.loads[outcome])
        yield loads
        yield CounterMetricFamily("modelbus_model_load_bytes", "bytes moved by model loads", value=t.load_bytes)
        yield CounterMetricFamily("modelbus_model_load_seconds", "seconds spent loading", value=t.load_seconds)
        yield CounterMetricFamily("modelbus_download_bytes", "bytes of completed downloads", value=t.download_bytes)
        kinds = CounterMetricFamily("modelbus_activity_events", "activity events by kind", labels=["kind"])
        for kind, n in sorted(t.kinds.items()):
            kinds.add_metric([kind], n)
        yield kinds


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.requests = PromCounter("modelbus_http_requests", "HTTP requests", ["method", "route", "status"],
                                    registry=registry)
        self.latency = Histogram("modelbus_http_request_seconds", "HTTP request latency", ["method", "route"],
                                 registry=registry)

    def observe(self, method: str, route: str, status: int, started: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(time.perf_counter() - started)


def build_registry(client: ModelBusClient) -> tuple[CollectorRegistry, HttpMetrics]:
    registry = CollectorRegistry()
    registry.register(ModelBusCollector(client))
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # several API processes: theirs summed from the files
        MultiProcessCollector(registry)
        return registry, HttpMetrics(None)
    return registry, HttpMetrics(registry)
