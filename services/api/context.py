"""Every request carries an id, and an error escaping a route is logged once, here.

The id is the caller's ``X-Request-ID`` when it is a short safe token (letters, digits, ``._-``), else a
new one; it is bound to every log line written while the request runs and returned in the response's
``X-Request-ID``. An exception that escapes a route is logged as one line (method, path, request id,
a traceback without locals; see events/logs.py for what is scrubbed) and answered 500 with the id, so
neither Starlette nor uvicorn prints it again. Nothing of the request's headers or body is logged.
"""

from __future__ import annotations

import re
import uuid

import structlog
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelbus.events.logs import get_logger
from modelbus.services.api.errors import error_response

log = get_logger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
_SAFE_ID = re.compile(rb"[A-Za-z0-9._\-]{1,64}")


def request_id_of(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id" and _SAFE_ID.fullmatch(value):
            return value.decode()
    return uuid.uuid4().hex


class RequestContext:
    """ASGI middleware: the request id in, the log context and the response header; the 500 of last resort."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_of(scope)
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = rid
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=rid):
            try:
                await self.app(scope, receive, send_with_id)
            except Exception as exc:  # the one place a route's bug is logged and answered
                log.error("api_internal_error", method=scope.get("method"), path=scope.get("path"),
                          error=type(exc).__name__, exc_info=exc)
                if started:  # the answer is under way: the connection just ends
                    return
                response = error_response(500, "InternalError", f"internal error ({type(exc).__name__}); "
                                          f"request id {rid}, see the server log")
                await response(scope, receive, send_with_id)
