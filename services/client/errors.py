"""Errors of the client (and so of the HTTP API and the CLI, which sit on it).

    ClientError
    ├── NotFoundError          no such install job or GPU worker (unknown model keys raise the record service's
    │                          UnknownModelException, which callers already know)
    ├── InvalidRequestError    an argument rejected before anything changed (bad source, position...)
    ├── UnavailableError       Redis does not answer (after the store's own retries)
    ├── WaitTimeoutError       ``wait()`` ran out of time; the job goes on
    └── JobFailedError         a worker ran the job and it failed (the message is the worker's)

The record service's exceptions (Unknown/Duplicate/InvalidModelConfig) pass through unchanged:
they are part of the public API (DESIGN.md), and the API maps them to 404/409/422.
"""

from __future__ import annotations


class ClientError(Exception):
    """Base of every error raised by ``services.client`` itself."""


class NotFoundError(ClientError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "not found"


class InvalidRequestError(ClientError, ValueError):
    pass


class UnavailableError(ClientError):
    pass


class WaitTimeoutError(ClientError, TimeoutError):
    pass


class JobFailedError(ClientError):
    """A worker ran the job and it failed; the message is the worker's error."""
