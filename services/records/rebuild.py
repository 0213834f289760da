"""Rebuilding a record projection from the whole log (``modelbus records rebuild``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from modelbus.events.logs import get_logger
from modelbus.events.store import EventStore
from modelbus.services.records.service import ModelRecordServiceBase

log = get_logger(__name__)


@dataclass(frozen=True)
class RebuildReport:
    store: str          # the service class
    location: str       # the file, or "<memory>" / "<shared connection>"
    models: int         # records after the rebuild
    checkpoint: str     # the last log position applied
    seconds: float


def _location(service: ModelRecordServiceBase) -> str:
    projection = service.projection
    return str(getattr(projection, "path", None) or getattr(projection, "where", None) or "<memory>")


def rebuild(config: Any = None, *, service: ModelRecordServiceBase | None = None,
            event_store: EventStore | None = None) -> RebuildReport:
    """Replay the log into the record store ``config`` names (or into ``service``), from scratch."""
    own = service is None
    if service is None:
        from modelbus.services.config import AppConfig

        config = config if config is not None else AppConfig.load()
        service = ModelRecordServiceBase.open(config, event_store=event_store)
    try:
        started = time.perf_counter()
        checkpoint = service.rebuild()
        report = RebuildReport(type(service).__name__, _location(service), service.projection.count(),
                               checkpoint, time.perf_counter() - started)
    finally:
        if own:
            service.close()
    log.info("records_rebuilt", **report.__dict__)
    return report
