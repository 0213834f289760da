"""Errors of the client (and so of the HTTP API and the CLI, which sit on it).

    ClientError
    ├── NotFoundError          (NotFound) no such install job or GPU worker (unknown model keys raise the
    │                          record service's UnknownModelException, which callers already know)
    ├── InvalidRequestError    (InvalidInput) an argument rejected before anything changed (bad source...)
    ├── UnavailableError       (Unavailable) Redis does not answer (after the store's own retries)
    ├── WaitTimeoutError       (TimedOut) ``wait()`` ran out of time; the job goes on
    └── JobFailedError         (Failed) a worker ran the job and it failed (the message is the worker's)

The install service's and the GPU routing's errors are translated into these by their kind
(``CLIENT_ERRORS``), so that a caller of the client meets one family.

The record service's exceptions (Unknown/Duplicate/InvalidModelConfig) pass through unchanged:
they are part of the public API (DESIGN.md), and the API maps them to 404/409/422.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from modelbus.events.errors import (
    Failed,
    InvalidInput,
    Kind,
    ModelbusError,
    NotFound,
    StoreUnavailableError,
    TimedOut,
    Unavailable,
)


class ClientError(ModelbusError):
    """Base of every error raised by ``services.client`` itself."""


class NotFoundError(ClientError, NotFound, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "not found"


class InvalidRequestError(ClientError, InvalidInput, ValueError):
    pass


class UnavailableError(ClientError, Unavailable):
    pass


class WaitTimeoutError(ClientError, TimedOut, TimeoutError):
    pass


class JobFailedError(ClientError, Failed):
    """A worker ran the job and it failed; the message is the worker's error."""


#: the client's error for each kind met in the services it drives (install, routing)
CLIENT_ERRORS: dict[Kind, type[ClientError]] = {
    Kind.NOT_FOUND: NotFoundError, Kind.INVALID_INPUT: InvalidRequestError, Kind.UNAVAILABLE: UnavailableError,
    Kind.TIMED_OUT: WaitTimeoutError, Kind.FAILED: JobFailedError,
}


@contextmanager
def translated() -> Iterator[None]:
    """Install, routing and event-store errors, as the client's of the same kind (conflicts pass as they are)."""
    try:
        yield
    except ModelbusError as exc:
        # imported here: a client that only reads records never imports the install service (nor RQ)
        from modelbus.services.install.errors import InstallError
        from modelbus.services.routing import RoutingError
        client_error = CLIENT_ERRORS.get(exc.kind)
        if client_error is None or not isinstance(exc, (InstallError, RoutingError, StoreUnavailableError)):
            raise
        raise client_error(str(exc)) from exc
