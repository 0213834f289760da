"""``create_app(config=None) -> FastAPI``: the HTTP API over one ModelBusClient.

Served by uvicorn (``uvicorn modelbus.services.api:create_app --factory``, which ``modelbus up`` runs). The app
starts even when Redis is down: every call that needs it answers 503 until it is back.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request, Response

from modelbus.events.keys import Keys
from modelbus.events.logs import configure_logging
from modelbus.services.api.auth import require_token
from modelbus.services.api.context import RequestContext
from modelbus.services.api.errors import COMMON_RESPONSES, install_error_handlers
from modelbus.services.api.guard import install_guard
from modelbus.services.api.limits import RequestLimits
from modelbus.services.api.metrics import build_registry
from modelbus.services.api.routes import events, health, lifecycle, modeldata, models
from modelbus.services.api.streams import StreamSeats
from modelbus.services.api.ui import install_ui
from modelbus.services.client import AsyncModelBusClient, ModelBusClient
from modelbus.services.config import AppConfig

API_RETRY_DEADLINE = 2.0  # s a request retries a vanished Redis before it answers 503


def create_app(config: AppConfig | None = None, client: ModelBusClient | None = None) -> FastAPI:
    config = config if config is not None else AppConfig.load()
    configure_logging(config.log_format, config.log_level, config.secret_values)  # uvicorn's loggers too
    client = client if client is not None else ModelBusClient(config, retry_deadline=API_RETRY_DEADLINE)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        client.close()

    app = FastAPI(title="modelbus", version="2.0",
                  description="An event-sourced model manager: records, installs, loads and live events.",
                  lifespan=lifespan)  # body limits: services.api.limits (Starlette's would answer before it)
    app.state.config = config
    app.state.client = client
    app.state.aclient = AsyncModelBusClient(client=client)
    app.state.registry, http_metrics = build_registry(client)
    install_error_handlers(app)
    secured = [Depends(require_token)]
    app.include_router(models.router, dependencies=secured, responses=COMMON_RESPONSES)
    app.include_router(events.router, dependencies=secured, responses=COMMON_RESPONSES)
    app.include_router(modeldata.router, dependencies=secured, responses=COMMON_RESPONSES)
    app.include_router(health.router)
    install_ui(app)  # the web page at /ui
    app.include_router(lifecycle.router, dependencies=secured, responses=COMMON_RESPONSES)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        http_metrics.observe(request.method, route, response.status_code, started)
        return response

    seats = StreamSeats(lambda: client.redis, Keys(config.namespace), config.api_max_streams_per_client)
    app.add_middleware(RequestLimits, config=config, seats=seats)  # token, body size, concurrency before work
    install_guard(app, config)  # outside it: Host, browsers, token on the documents (headers only)
    app.add_middleware(RequestContext)  # outermost: every answer carries a request id
    return app
