"""GPU worker jobs: load, unload, drop and stats against this process's model cache."""

from __future__ import annotations

from typing import Any


def cache_state() -> dict[str, Any]:
    """What the heartbeat publishes about this worker's cache (filled in by the load service)."""
    from workers.context import current
    context = current()
    service = context.extras.get("load_service")
    if service is None:
        return {"device": context.device, "models": [], "vram_free": None}
    return dict(service.cache_state())
