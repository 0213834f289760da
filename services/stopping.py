"""The running job's stop check, for work too deep to be handed a callback.

Long loops (scanning a pickle's opcodes, hashing a file) call :func:`checkpoint` between chunks; a job
that can be cancelled runs its work inside :func:`stop_on` with a check that raises when the job is
to stop (its cancel flag is set). Outside any job, :func:`checkpoint` does nothing. The check is
context-local, so two jobs in one process (threads) never see each other's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_check: ContextVar[Callable[[], None] | None] = ContextVar("modelbus_stop_check", default=None)


def checkpoint() -> None:
    """Raise the running job's stop error if it is to stop; nothing otherwise."""
    check = _check.get()
    if check is not None:
        check()


@contextmanager
def stop_on(check: Callable[[], None]) -> Iterator[None]:
    """Run the block with ``check`` as the stop check that :func:`checkpoint` calls."""
    token = _check.set(check)
    try:
        yield
    finally:
        _check.reset(token)
