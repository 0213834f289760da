"""Limits before work: what every HTTP request passes before the app reads a byte of its body.

Pure ASGI (not BaseHTTPMiddleware), so nothing is buffered and event streams flow. For each request:

1. A request that carries a body (``Content-Length`` > 0, or chunked) must hold the bearer token when one
   is configured: 401 before a byte of the body is read. (Requests without a body are checked by the
   routes' own dependency; both use :func:`services.api.auth.token_matches`.)
2. A declared ``Content-Length`` over ``api_max_body`` is 413 at once. A chunked body is counted here as
   it streams and answered 413 the moment the count passes the limit; the rest is never read. (Not by
   Starlette's app-wide body limit: it answers a declared length over it with its own plain-text 413
   before this middleware can say 401, and ends the request with an exception of its own.)
3. At most ``api_max_requests`` requests run at once; one over the limit waits up to ``api_queue_wait``
   seconds for a slot, then gets 503 with ``Retry-After`` (kube-apiserver's max-requests-inflight).
   A slot is not held by a client that stops sending: a body that pauses longer than
   ``api_body_timeout`` seconds is 408 (nginx's ``client_body_timeout``), and its slot is free again.
4. Event streams are long-running, so they are not counted there (kube-apiserver exempts watches too)
   but per client address: at most ``api_max_streams_per_client`` at once, then 429 with ``Retry-After``
   (nginx's ``limit_conn`` per ``$remote_addr``), counted in Redis across every API process
   (:mod:`services.api.streams`).
"""

from __future__ import annotations

import asyncio
import re

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelbus.events.errors import TimedOut
from modelbus.services.api.auth import UNAUTHORIZED, bearer_token, token_matches
from modelbus.services.api.errors import error_response
from modelbus.services.api.streams import StreamSeats
from modelbus.services.config import AppConfig
from modelbus.services.covers.limits import MAX_COVER_BYTES

#: paths whose responses are endless event streams (counted per client, not as requests in flight)
STREAM_PATHS = frozenset({"/api/v2/events"})
RETRY_AFTER = "1"  # s a refused client is told to wait
#: routes with a body limit of their own instead of api_max_body (each route keeps it for chunked bodies too)
ROUTE_BODY_LIMITS: tuple[tuple[re.Pattern[str], int], ...] = (
    (re.compile(r"/api/v2/models/i/[^/]+/cover"), MAX_COVER_BYTES),)


class RequestLimits:
    """The ASGI middleware keeping the rules of this module (one per app; state lives in its event loop)."""

    def __init__(self, app: ASGIApp, config: AppConfig, seats: StreamSeats) -> None:
        self.app = app
        self.token = config.api_token
        self.max_body = config.api_max_body
        self.max_requests = config.api_max_requests
        self.queue_wait = config.api_queue_wait
        self.body_timeout = config.api_body_timeout
        self.max_streams = config.api_max_streams_per_client
        self._slots = asyncio.Semaphore(config.api_max_requests)
        self.seats = seats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(Headers(scope=scope), scope["path"])
        if refusal is not None:
            await refusal(scope, receive, send)
        elif scope["path"] in STREAM_PATHS:
            await self._stream(scope, receive, send)
        else:
            await self._counted(scope, receive, send)

    def _refusal(self, headers: Headers, path: str) -> Response | None:
        """401 or 413 for a request whose body must not be read; None to go on."""
        length = _content_length(headers)
        has_body = bool(length) or "transfer-encoding" in headers
        if not has_body:
            return None
        # Connection: close, because the unread body would otherwise be taken for the next request
        if not token_matches(self.token, bearer_token(headers.get("authorization"))):
            return error_response(401, "HTTPError", UNAUTHORIZED,
                                  headers={"WWW-Authenticate": "Bearer", "Connection": "close"})
        limit, setting = self._limit(path)
        if length is not None and length > limit:
            return error_response(413, "RequestTooLarge",
                                  f"request body of {length} bytes is over the limit of {limit} bytes "
                                  f"({setting})", headers={"Connection": "close"})
        return None

    def _limit(self, path: str) -> tuple[int, str]:
        """The body limit of ``path`` and the setting that names it."""
        return next(((n, "the route's own") for p, n in ROUTE_BODY_LIMITS if p.fullmatch(path)),
                    (self.max_body, "MODELBUS_API_MAX_BODY"))

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not await self._take_slot():
            busy = error_response(503, "ServerBusy",
                                  f"the API is serving its limit of {self.max_requests} requests at once "
                                  "(MODELBUS_API_MAX_REQUESTS); retry shortly", headers={"Retry-After": RETRY_AFTER})
            await busy(scope, receive, send)
            return
        try:
            await _InTime(self.body_timeout, self._limit(scope["path"]), scope, receive, send).run(self.app)
        finally:
            self._slots.release()

    async def _take_slot(self) -> bool:
        if self.queue_wait <= 0:
            if self._slots.locked():
                return False
            await self._slots.acquire()  # free: returns at once
            return True
        try:
            await asyncio.wait_for(self._slots.acquire(), self.queue_wait)
        except TimeoutError:
            return False
        return True

    async def _stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = (scope.get("client") or ("unknown", 0))[0]
        seat, held = await self.seats.take(client)
        if seat is None:
            refused = error_response(429, "TooManyStreams",
                                     f"{client} already has {held} event streams open, the limit "
                                     "(MODELBUS_API_MAX_STREAMS_PER_CLIENT)", headers={"Retry-After": RETRY_AFTER})
            await refused(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            await self.seats.give_back(seat)


def _content_length(headers: Headers) -> int | None:
    raw = headers.get("content-length")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None  # the server (h11/httptools) refuses a malformed length itself


class _BodyStalled(TimedOut):
    """The body paused too long; the 408 is sent already (internal: never reaches a caller)."""


class _BodyTooLarge(_BodyStalled):
    """A chunked body passed its limit; the 413 is sent already (internal: never reaches a caller)."""


class _InTime:
    """One request whose body may pause at most ``timeout`` seconds at a time and hold at most its limit.
    On a longer pause it answers 408 itself, past the limit 413, and ends the app's work; what the app
    would still send is dropped."""

    def __init__(self, timeout: float, limit: tuple[int, str], scope: Scope, receive: Receive, send: Send) -> None:
        self.timeout, self.scope, self._receive, self._send = timeout, scope, receive, send
        self.limit, self.setting = limit
        self.received = 0
        self.body_done = False
        self.started = False
        self.answered = False

    async def run(self, app: ASGIApp) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except _BodyStalled:
            pass
        except Exception:
            if not self.answered:
                raise

    async def receive(self) -> Message:
        if self.body_done:
            return await self._receive()  # after the body: only a disconnect comes, whenever it does
        try:
            message = await asyncio.wait_for(self._receive(), self.timeout)
        except TimeoutError:
            await self._answer(error_response(408, "RequestTimeout", f"the request body paused for more than "
                                              f"{self.timeout:g} s (MODELBUS_API_BODY_TIMEOUT)",
                                              headers={"Connection": "close"}))
            raise _BodyStalled from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                await self._answer(error_response(413, "RequestTooLarge", f"request body over the limit of "
                                                  f"{self.limit} bytes ({self.setting})",
                                                  headers={"Connection": "close"}))
                raise _BodyTooLarge
        self.body_done = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    async def _answer(self, response: Response) -> None:
        if not self.started:
            await response(self.scope, self._receive, self._send)
        self.answered = True

    async def send(self, message: Message) -> None:
        if self.answered:
            return
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)
