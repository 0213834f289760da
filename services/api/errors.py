"""Every error the API returns is JSON ``{"error": {"type", "message", "details"}}`` with a status that
says what went wrong. The status follows from the error's kind (``events.errors``) in one table, so a
route never builds an error response by hand and no package's errors are listed here.

    404  not found (model key, job, worker)    409  conflict (duplicate key/path, concurrent writers)
    422  invalid input (config, parameter)     413  over a limit          403  forbidden
    502  a worker ran the job and it failed    503  Redis unreachable, or no GPU worker to wait for
    504  waiting for a worker timed out        401  missing/wrong bearer token
    500  a bug, or a library's error nobody translated (logged with its traceback)
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from modelbus.events.errors import Kind, ModelbusError, kind_of
from modelbus.events.logs import get_logger

log = get_logger(__name__)

STATUS: dict[Kind, int] = {
    Kind.NOT_FOUND: 404, Kind.CONFLICT: 409, Kind.INVALID_INPUT: 422, Kind.TOO_LARGE: 413, Kind.FORBIDDEN: 403,
    Kind.UNAVAILABLE: 503, Kind.TIMED_OUT: 504, Kind.FAILED: 502,
}


class ErrorBody(BaseModel):
    type: str
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_response(status: int, type_: str, message: str, details: list[dict[str, Any]] | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    body = ErrorResponse(error=ErrorBody(type=type_, message=message, details=details))
    return Response(orjson.dumps(body.model_dump(mode="json")), status_code=status, headers=headers,
                    media_type="application/json")


def status_of(exc: BaseException) -> int:
    kind = kind_of(exc)
    return 500 if kind is None else STATUS[kind]


def _details(exc: BaseException) -> list[dict[str, Any]] | None:
    """Field errors of an invalid input that names them (``InvalidModelConfigException.errors``)."""
    errors = getattr(exc, "errors", None)
    if kind_of(exc) is Kind.INVALID_INPUT and isinstance(errors, list) and errors:
        return [{"field": e.field, "value": repr(e.value), "message": e.message} for e in errors]
    return None


async def _library_error(request: Request, exc: Exception) -> Response:
    status = status_of(exc)
    if status == 500:
        log.error("api_internal_error", path=request.url.path, method=request.method, exc_info=exc)
        rid = getattr(request.state, "request_id", "?")  # services/api/context.py; also in X-Request-ID
        return error_response(500, "InternalError", f"internal error ({type(exc).__name__}); "
                              f"request id {rid}, see the server log")
    headers = {"Retry-After": "5"} if status == 503 else None
    return error_response(status, type(exc).__name__, str(exc), _details(exc), headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    details = [{"field": ".".join(str(p) for p in e.get("loc", ())), "message": e.get("msg", ""),
                "value": repr(e.get("input"))[:200]} for e in exc.errors()]
    fields = ", ".join(d["field"] for d in details)
    return error_response(422, "RequestValidationError", f"invalid request: {fields}", details)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    return error_response(exc.status_code, "HTTPError", str(exc.detail), headers=getattr(exc, "headers", None))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    # modelbus errors get their own handler: a bare Exception handler would only run in Starlette's
    # outermost middleware, which re-raises after answering
    app.add_exception_handler(ModelbusError, _library_error)
    app.add_exception_handler(Exception, _library_error)


#: the ``responses`` of a FastAPI route: status -> its OpenAPI description
Responses = dict[int | str, dict[str, Any]]

# the error statuses every route may answer, for the OpenAPI document
COMMON_RESPONSES: Responses = {
    401: {"model": ErrorResponse, "description": "missing or wrong bearer token"},
    404: {"model": ErrorResponse, "description": "unknown model key, install job or worker"},
    422: {"model": ErrorResponse, "description": "invalid request or model config"},
    503: {"model": ErrorResponse, "description": "Redis unreachable"},
}
NOT_FOUND: Responses = {404: {"model": ErrorResponse, "description": "unknown model key, job or worker"}}
CONFLICT: Responses = {409: {"model": ErrorResponse, "description": "duplicate model key or path, or a path "
                                                                   "shared with another model (named)"}}
FORBIDDEN: Responses = {403: {"model": ErrorResponse, "description": "a local path outside the import roots"}}
