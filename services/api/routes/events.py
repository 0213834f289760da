"""``GET /api/v2/events``: Server-Sent Events from both streams.

Each message's ``id`` is the resume token, so a browser's EventSource (or any SSE client) that
reconnects with ``Last-Event-ID`` continues exactly after the last event it got. ``types`` filters by
domain event type or activity kind. An idle stream gets a comment line now and then, so proxies keep it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from modelbus.services.api.errors import Responses
from modelbus.services.client import AsyncModelBusClient, Cursor, Delivered, defaults

router = APIRouter(prefix="/api/v2", tags=["events"])

SSE_RESPONSE: Responses = {200: {"description": "an endless text/event-stream; each message's id resumes after it",
                      "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def format_event(delivered: Delivered) -> bytes:
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (str(delivered.cursor).encode(), delivered.type.encode(),
                                                  delivered.to_json())


def _types(raw: list[str] | None) -> list[str] | None:
    wanted = [t.strip() for item in (raw or []) for t in item.split(",") if t.strip()]
    return wanted or None


@router.get("/events", response_class=StreamingResponse, responses=SSE_RESPONSE, summary="Live events (SSE)")
async def events(request: Request,
                 types: Annotated[list[str] | None, Query(description="event types or activity kinds "
                                                                      "(repeat, or comma-separated)")] = None,
                 since: Annotated[str, Query(max_length=100, description="'$' (new only), '0' (all), "
                                                                        "or a position/token")] = "$",
                 last_event_id: Annotated[str | None, Header(max_length=100)] = None,
                 ) -> StreamingResponse:
    start = last_event_id or since
    if start.strip() != "$":
        Cursor.parse(start)  # a bad position is a 422 now, not a broken stream later
    aclient: AsyncModelBusClient = request.app.state.aclient
    await asyncio.to_thread(lambda: aclient.sync.store)  # Redis unreachable: a 503 before the stream starts
    stream = aclient.subscribe(_types(types), start, block_ms=defaults.SSE_BLOCK_MS)
    return StreamingResponse(_frames(request, stream), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _frames(request: Request, stream: AsyncIterator[Delivered]) -> AsyncIterator[bytes]:
    yield b"retry: 1000\n: connected\n\n"
    pending: asyncio.Task[Delivered] | None = None
    try:
        while not await request.is_disconnected():
            if pending is None:
                pending = asyncio.ensure_future(stream.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=defaults.SSE_KEEPALIVE_SECONDS)
            if not done:
                yield b": keepalive\n\n"
                continue
            try:
                delivered = pending.result()
            except StopAsyncIteration:
                return
            finally:
                if done:
                    pending = None
            yield format_event(delivered)
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
                await pending
        await stream.aclose()  # type: ignore[attr-defined]
