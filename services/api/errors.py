"""Every error the API returns is JSON ``{"error": {"type", "message", "details"}}`` with a status that
says what went wrong. One table maps the library's errors (records, client, event store) to statuses,
so a route never builds an error response by hand.

    404  unknown model key, job or worker          409  duplicate key/path, concurrent writers
    422  invalid config, bad parameter             401  missing/wrong bearer token
    502  a worker ran the job and it failed        503  Redis unreachable, or no GPU worker to wait for
    504  waiting for a worker timed out            500  a bug (logged with its traceback)
"""

from __future__ import annotations

from typing import Any

import orjson
import redis
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from events.errors import EmbeddedRedisError, StoreUnavailableError
from services.client.errors import (
    InvalidRequestError,
    JobFailedError,
    NotFoundError,
    UnavailableError,
    WaitTimeoutError,
)
from services.config import ConfigError
from services.install import DuplicateInstallError, InstallError, ModelIdentificationError
from services.install.errors import ModelPathConflictError, SourceForbiddenError
from services.records import DuplicateModelException, InvalidModelConfigException, UnknownModelException
from services.records.errors import RecordConflictError, RecordServiceError

log = structlog.get_logger(__name__)

STATUS: tuple[tuple[type[Exception] | tuple[type[Exception], ...], int], ...] = (
    ((UnknownModelException, NotFoundError), 404),
    (SourceForbiddenError, 403),
    ((DuplicateModelException, RecordConflictError, DuplicateInstallError, ModelPathConflictError), 409),
    ((InvalidModelConfigException, InvalidRequestError, ConfigError, ModelIdentificationError, InstallError,
      RecordServiceError), 422),
    (JobFailedError, 502),
    ((UnavailableError, StoreUnavailableError, EmbeddedRedisError, redis.ConnectionError, redis.TimeoutError), 503),
    (WaitTimeoutError, 504),
)


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
    for classes, status in STATUS:
        if isinstance(exc, classes):
            return status
    return 500


def _details(exc: BaseException) -> list[dict[str, Any]] | None:
    errors = getattr(exc, "errors", None)
    if isinstance(exc, InvalidModelConfigException) and errors:
        return [{"field": e.field, "value": repr(e.value), "message": e.message} for e in errors]
    return None


async def _library_error(request: Request, exc: Exception) -> Response:
    status = status_of(exc)
    if status == 500:
        log.error("api_internal_error", path=request.url.path, method=request.method, exc_info=exc)
        return error_response(500, "InternalError", f"internal error ({type(exc).__name__}); see the server log")
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
    # each known family gets its own handler: a bare Exception handler would only run in Starlette's
    # outermost middleware, which re-raises after answering
    for classes, _ in STATUS:
        for cls in classes if isinstance(classes, tuple) else (classes,):
            app.add_exception_handler(cls, _library_error)
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
