"""What a GPU worker does before it loads a model from the store: bring its blobs into the host cache.

``ModelFetcher.locate(record)`` is the load service's way to the files: the model's manifest from its
``ModelAdded`` event, then :meth:`HostCache.ensure` (parallel, verified, evicting what it must). A fetch
is news on the activity stream: ``model_fetch_started``, ``model_fetch_progress`` (at most every
``PROGRESS_INTERVAL``) and ``model_fetch_completed`` (or ``model_fetch_failed``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from modelbus.events.logs import get_logger
from modelbus.services.install.manifest import recorded_manifest
from modelbus.services.store import defaults
from modelbus.services.store.blobs import BlobStore
from modelbus.services.store.cache import HostCache

log = get_logger(__name__)

MODEL_FETCH_STARTED = "model_fetch_started"
MODEL_FETCH_PROGRESS = "model_fetch_progress"
MODEL_FETCH_COMPLETED = "model_fetch_completed"
MODEL_FETCH_FAILED = "model_fetch_failed"

Publish = Callable[[str, dict[str, Any]], None]


class ModelFetcher:
    def __init__(self, config: Any, store: BlobStore, records: Any, publish: Publish | None = None) -> None:
        self.cache = HostCache(config.cache_path, int(config.cache_size), store)
        self.records = records
        self.publish = publish or (lambda kind, payload: None)

    def locate(self, record: Any) -> Path:
        self.cache.forget_removed(self.records.exists)  # deleted models leave this host's cache lazily
        files = recorded_manifest(self.records.history(record.key))
        name = PurePosixPath(str(record.path)).name
        state: dict[str, Any] = {}
        lock = threading.Lock()

        def started(blobs: int, total: int) -> None:
            state.update(total=total, done=0, last=0.0, start=time.perf_counter())
            self.publish(MODEL_FETCH_STARTED, {"model_key": record.key, "blobs": blobs, "total_bytes": total})

        def progress(n: int) -> None:
            with lock:
                state["done"] = state.get("done", 0) + n
                now = time.perf_counter()
                if now - state.get("last", 0.0) < defaults.PROGRESS_INTERVAL:
                    return
                state["last"] = now
                payload = {"model_key": record.key, "bytes": state["done"], "total_bytes": state.get("total", 0)}
            self.publish(MODEL_FETCH_PROGRESS, payload)

        try:
            path = self.cache.ensure(record.key, name, files, progress=progress, on_fetch=started)
        except Exception as exc:
            if state:
                self.publish(MODEL_FETCH_FAILED, {"model_key": record.key, "error": f"{type(exc).__name__}: {exc}"})
            raise
        if state:
            seconds = time.perf_counter() - state["start"]
            self.publish(MODEL_FETCH_COMPLETED, {"model_key": record.key, "bytes": state["total"], "seconds": seconds})
            log.info("model_fetched", key=record.key, bytes=state["total"], seconds=round(seconds, 3))
        return path
