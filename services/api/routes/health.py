"""``/healthz`` (Redis reachable, workers alive; from services.api.health_state, refreshed at most once a
second) and ``/metrics`` (Prometheus). Neither needs the token:
they are for probes and scrapers."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from modelbus.services.api.health_state import HealthState
from modelbus.services.api.schemas import Health
from modelbus.services.client import defaults

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}},
            summary="Redis reachable (503 if not); live workers (503 with require_workers if none)")
async def healthz(request: Request,
                  require_workers: Annotated[bool, Query(description="answer 503 when no worker is alive")] = False,
                  ) -> Response:
    state: HealthState | None = getattr(request.app.state, "health", None)
    if state is None:  # one per app, made on the first probe (no await since the check: no race)
        state = request.app.state.health = HealthState(request.app.state.client)
    snapshot = state.fresh()
    if snapshot is None:
        try:
            snapshot = await asyncio.wait_for(asyncio.to_thread(state.refresh), defaults.HEALTH_REDIS_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - anything but an answer from Redis means: not healthy
            snapshot = state.failed(str(exc) or type(exc).__name__)
    status = 503 if not snapshot.available or (require_workers and snapshot.workers_alive == 0) else 200
    return Response(snapshot.body, status_code=status, media_type="application/json")


@router.get("/metrics", response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    body = await asyncio.to_thread(generate_latest, request.app.state.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
