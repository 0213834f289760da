"""``/healthz`` (Redis reachable, workers alive) and ``/metrics`` (Prometheus). Neither needs the token:
they are for probes and scrapers."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.api.schemas import Health, RedisHealth
from services.client import ModelBusClient, defaults

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}},
            summary="Redis reachable (503 if not); live workers (503 with require_workers if none)")
async def healthz(request: Request,
                  require_workers: Annotated[bool, Query(description="answer 503 when no worker is alive")] = False,
                  ) -> Response:
    client: ModelBusClient = request.app.state.client

    def probe() -> Health:
        latency = client.ping()
        workers, queues = client.workers(), client.queue_lengths()
        served = {q for w in workers for q in w.get("queues", [])}
        return Health(status="ok", redis=RedisHealth(ok=True, latency_ms=round(latency * 1000, 3)),
                      workers_alive=len(workers), queues=queues,
                      unserved=sorted(q for q, n in queues.items() if n and q not in served),
                      quarantined=client.quarantine_count())

    try:
        health = await asyncio.wait_for(asyncio.to_thread(probe), defaults.HEALTH_REDIS_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - anything but an answer from Redis means: not healthy
        message = str(exc) or type(exc).__name__
        health = Health(status="unavailable", redis=RedisHealth(ok=False, error=message), workers_alive=0)
        return _json(health, 503)
    if health.workers_alive == 0 or health.unserved or health.quarantined:
        health.status = "degraded"
    status = 503 if require_workers and health.workers_alive == 0 else 200
    return _json(health, status)


def _json(health: Health, status: int) -> Response:
    return Response(health.model_dump_json(), status_code=status, media_type="application/json")


@router.get("/metrics", response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    body = await asyncio.to_thread(generate_latest, request.app.state.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
