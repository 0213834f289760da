"""Profiling hook for the benchmarks' worker processes (bench_scaling ``MODELBUS_BENCH_PROFILE=DIR``).

On the workers' ``PYTHONPATH`` this module is imported at start-up. Every job process a worker forks
(RQ's work-horse) runs under cProfile (wall-clock timer, so time spent waiting on a lock, a socket or
a disk shows too) and writes ``DIR/horse-<pid>.prof`` before it exits; the worker process itself writes
``DIR/worker-<pid>.prof`` at exit. ``tests/bench/profile_report.py DIR`` sums them up.
"""

from __future__ import annotations

import os

_DIR = os.environ.get("MODELBUS_BENCH_PROFILE")

if _DIR:
    import atexit
    import cProfile

    _state: dict[str, object] = {}

    def _start(kind: str) -> None:
        profiler = cProfile.Profile()
        _state.update(profiler=profiler, kind=kind, pid=os.getpid())
        profiler.enable()

    def _dump() -> None:
        profiler = _state.get("profiler")
        if profiler is None or _state.get("pid") != os.getpid():
            return
        profiler.disable()  # type: ignore[attr-defined]
        os.makedirs(_DIR, exist_ok=True)
        profiler.dump_stats(os.path.join(_DIR, f"{_state['kind']}-{os.getpid()}.prof"))  # type: ignore[attr-defined]
        _state.pop("profiler", None)

    _real_exit = os._exit

    def _exit(code: int) -> None:  # RQ's work-horse leaves through os._exit: no atexit there
        try:
            _dump()
        finally:
            _real_exit(code)

    os._exit = _exit
    os.register_at_fork(after_in_child=lambda: _start("horse"))
    atexit.register(_dump)
    _start("worker")
