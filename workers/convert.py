"""The hash queue's convert job: a single-file checkpoint to a diffusers folder (services.convert), on a
worker because it reads and writes model files. Returns what the client's call returns; an error of
modelbus's own comes back as ``{"error": {...}}`` (see workers.scan)."""

from __future__ import annotations

from typing import Any

from modelbus.events.errors import ModelbusError
from modelbus.services.convert.folder import convert
from modelbus.workers.context import current
from modelbus.workers.scan import _installer, _refused


def run_convert(key: str, keep_original: bool = False) -> dict[str, Any]:
    context = current()
    try:
        installer = _installer(context)
        try:
            return convert(context.config, installer, key, keep_original)
        finally:
            installer.record_store.close()
    except ModelbusError as exc:
        return _refused(exc)
