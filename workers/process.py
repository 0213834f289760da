"""Processes that die with their parent (Linux ``prctl(PR_SET_PDEATHSIG)``), so that nothing a worker
or ``modelbus up`` started outlives it: a job's work-horse killed with its worker stops writing at once
instead of running on beside the re-run RQ gives the job to."""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not a glibc Linux: no parent-death signal (the lease still fences a stray run)
        return None


# loaded before any fork, so that a forked child makes a single prctl call (nothing that could wait
# on a lock another thread of the parent held at fork time)
_LIBC = _load_libc()


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> None:
    """In a freshly forked child: get ``sig`` when the parent dies, even by SIGKILL. With ``parent`` (the
    parent's pid before the fork), a parent that already died before the call ends the child at once."""
    if _LIBC is None:
        return
    _LIBC.prctl(PR_SET_PDEATHSIG, sig)
    if parent is not None and os.getppid() != parent:
        os._exit(1)
