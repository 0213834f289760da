"""What a job function needs, built once per worker process: the configuration and the event store.
Services that hold state (the GPU cache, the record projection) are created lazily by their jobs."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from modelbus.events.store import RedisEventStore
from modelbus.services.config import AppConfig


@dataclass
class WorkerContext:
    config: AppConfig
    store: RedisEventStore
    worker_id: str = "local"
    device: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def get(self, name: str, factory: Any) -> Any:
        """A per-process singleton (record service, load service...)."""
        with self.lock:
            if name not in self.extras:
                self.extras[name] = factory(self)
            return self.extras[name]


_context: WorkerContext | None = None


def set_context(context: WorkerContext) -> None:
    global _context
    _context = context


def current() -> WorkerContext:
    """The worker's context; a job run outside a worker (tests, burst in-process) builds one from the env."""
    global _context
    if _context is None:
        config = AppConfig.load()
        _context = WorkerContext(config=config, store=RedisEventStore.from_config(config))
    return _context
