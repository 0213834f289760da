"""The hash queue's scan and sync jobs: finding models in a folder and registering them runs on a
worker, never in the API process, because it reads headers and unpickles checkpoints (bounded, but
still the work of whatever file it meets).

A scan's folder must lie inside the import roots, as every local path that comes through the queue
(services.install.roots). Each job returns what the client's call returns; an error of modelbus's own
comes back as ``{"error": {"kind", "type", "message"}}``, so the caller raises one of the same kind
instead of a worker's traceback.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from modelbus.events.errors import ModelbusError
from modelbus.events.logs import get_logger
from modelbus.services.install import ModelInstallService
from modelbus.services.install.roots import check_local_source
from modelbus.workers.context import WorkerContext, current

log = get_logger(__name__)


def _installer(context: WorkerContext) -> ModelInstallService:
    return ModelInstallService(context.config, event_store=context.store)


def _refused(exc: ModelbusError) -> dict[str, Any]:
    log.warning("scan_refused", error_type=type(exc).__name__, error=str(exc))
    return {"error": {"kind": exc.kind.value, "type": type(exc).__name__, "message": str(exc)}}


refused = _refused  # (the other hash-queue jobs answer the same way)


def run_scan(path: str) -> dict[str, Any]:
    context = current()
    try:
        folder = check_local_source(path, context.config)
        installer = _installer(context)
        try:
            return {"added": installer.scan_directory(folder)}
        finally:
            installer.record_store.close()
    except ModelbusError as exc:
        return _refused(exc)


def run_sync() -> dict[str, Any]:
    context = current()
    try:
        installer = _installer(context)
        try:
            return dataclasses.asdict(installer.sync_models_dir())
        finally:
            installer.record_store.close()
    except ModelbusError as exc:
        return _refused(exc)
