"""How the CLI reports a failure: one readable line on stderr and an exit code that follows from the
error's kind (``events.errors``), in one table:

    1  failed (a job, a check), or anything else   3  not found (model key, job, worker)
    2  invalid input, over a limit, forbidden     4  conflict (duplicate key or path)
    5  Redis or a worker missing                  6  timed out (the job goes on)
    130 interrupted (Ctrl-C)

With ``--debug`` (or ``MODELBUS_DEBUG=1``) the traceback is shown instead.

    CliError
    ├── UsageError          (InvalidInput) a command line the CLI itself rejects (bad --set syntax...)
    └── CommandFailedError  (Failed) what the command did failed (an install, a doctor check, an import)
"""

from __future__ import annotations

from modelbus.events.errors import Failed, InvalidInput, Kind, ModelbusError, kind_of

EXIT_CODES: dict[Kind, int] = {
    Kind.FAILED: 1, Kind.INVALID_INPUT: 2, Kind.TOO_LARGE: 2, Kind.FORBIDDEN: 2, Kind.NOT_FOUND: 3,
    Kind.CONFLICT: 4, Kind.UNAVAILABLE: 5, Kind.TIMED_OUT: 6,
}
INTERRUPTED = 130


class CliError(ModelbusError):
    """Base of the failures the CLI itself detects."""


class UsageError(CliError, InvalidInput):
    pass


class CommandFailedError(CliError, Failed):
    pass


def exit_code(exc: BaseException) -> int:
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED
    kind = kind_of(exc)
    return 1 if kind is None else EXIT_CODES[kind]


def one_line(exc: BaseException) -> str:
    """The message on one line: the error's own text, prefixed by its class name when it is no modelbus error."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if kind_of(exc) is not None else f"{type(exc).__name__}: {text}"
