"""How the CLI reports a failure: one readable line on stderr and an exit code saying what kind.

    1  anything else               3  not found (model key, job, worker)
    2  bad input or configuration  4  conflict (duplicate key or path)
    5  Redis or a worker missing   6  timed out (the job goes on)
    130 interrupted (Ctrl-C)

With ``--debug`` (or ``MODELBUS_DEBUG=1``) the traceback is shown instead.
"""

from __future__ import annotations

import redis

from events.errors import EmbeddedRedisError, StoreUnavailableError
from services.client import InvalidRequestError, NotFoundError, UnavailableError, WaitTimeoutError
from services.client.errors import JobFailedError
from services.config import ConfigError
from services.install import DuplicateInstallError, InstallError
from services.install.errors import ModelPathConflictError
from services.records import DuplicateModelException, InvalidModelConfigException, UnknownModelException
from services.records.errors import RecordConflictError, RecordServiceError


class CliError(Exception):
    """A failure the CLI itself detects (bad --set syntax...), with its exit code."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


EXIT_CODES: tuple[tuple[tuple[type[BaseException], ...], int], ...] = (
    ((UnknownModelException, NotFoundError), 3),
    ((DuplicateModelException, RecordConflictError, DuplicateInstallError, ModelPathConflictError), 4),
    ((UnavailableError, StoreUnavailableError, EmbeddedRedisError, redis.ConnectionError, redis.TimeoutError), 5),
    ((WaitTimeoutError,), 6),
    ((InvalidModelConfigException, InvalidRequestError, ConfigError, InstallError, RecordServiceError,
      ValueError), 2),
    ((JobFailedError,), 1),
)


def exit_code(exc: BaseException) -> int:
    if isinstance(exc, CliError):
        return exc.code
    if isinstance(exc, KeyboardInterrupt):
        return 130
    for classes, code in EXIT_CODES:
        if isinstance(exc, classes):
            return code
    return 1


def one_line(exc: BaseException) -> str:
    """The message on one line: the error's own text, prefixed by its kind when that helps."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    text = " ".join(str(exc).split()) or type(exc).__name__
    known = any(isinstance(exc, classes) for classes, _ in EXIT_CODES) or isinstance(exc, CliError)
    return text if known else f"{type(exc).__name__}: {text}"
