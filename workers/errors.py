"""Errors of the worker processes, one family under :class:`WorkerError`.

    WorkerError
    └── LeaseLostError   (Conflict) another run of the job took its lease over: this run must stop
                                    without writing anything more
"""

from __future__ import annotations

from modelbus.events.errors import Conflict, ModelbusError


class WorkerError(ModelbusError):
    """Base of the errors raised by :mod:`workers`."""


class LeaseLostError(WorkerError, Conflict):
    """The job's lease is held under a newer fencing token: this run was given up for dead."""
