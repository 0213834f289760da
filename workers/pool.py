"""One worker process that runs several jobs at once (``--concurrency N``): a supervisor and N RQ
worker slots.

The supervisor forks the slots after the job modules were imported, so each starts warm. Slot ``i`` is
an ordinary worker named ``<name>-<i>`` (its own Redis connection, heartbeat, RQ loop and forked
work-horses), so RQ, the leases and the maintenance passes see N workers and hand a dead slot's job on
like any dead worker's. Rules:

- A slot gets SIGKILL when the supervisor dies (parent-death signal), and its work-horse with it.
- A slot runs in its own process group: a signal to the supervisor's group reaches each slot once,
  passed on by the supervisor (RQ takes a second SIGTERM as "kill the running job").
- SIGTERM or SIGINT to the supervisor is passed on to every slot (RQ's warm shutdown: each finishes
  its running job); the supervisor exits when they all have.
- A slot that dies otherwise is started again under its name, after a delay that doubles with each
  quick death (``SLOT_RESTART_*``). In burst mode a slot that ended cleanly is not started again.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

from modelbus.events.logs import get_logger
from modelbus.services.process import die_with_parent
from modelbus.workers import defaults

log = get_logger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def slot_names(name: str, concurrency: int) -> list[str]:
    return [f"{name}-{i}" for i in range(concurrency)]


@dataclass
class Slot:
    name: str
    pid: int | None = None
    started_at: float = 0.0
    delay: float = defaults.SLOT_RESTART_START
    restart_at: float | None = None


class Pool:
    """Runs ``target(name)`` (a worker's whole life; returns its exit code) in one forked process per slot."""

    def __init__(self, names: list[str], target: Callable[[str], int], burst: bool = False) -> None:
        self.slots = [Slot(n) for n in names]
        self.target = target
        self.burst = burst
        self.stopping = False

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            for slot in self.slots:
                self._spawn(slot)
            while any(s.pid is not None or (s.restart_at is not None and not self.stopping) for s in self.slots):
                self._reap()
                self._restart_due(time.monotonic())
                time.sleep(defaults.SLOT_POLL)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._kill_left()
        log.info("worker_pool_stopped", slots=len(self.slots))
        return 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        for slot in self.slots:
            slot.restart_at = None
            if slot.pid is not None:
                try:
                    os.kill(slot.pid, signum)
                except ProcessLookupError:
                    pass

    def _spawn(self, slot: Slot) -> None:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for sig in STOP_SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)  # not the supervisor's; RQ installs its own in the loop
                os.setpgrp()
                die_with_parent(signal.SIGKILL, parent)
                code = self.target(slot.name)
            except BaseException as exc:  # noqa: BLE001 - a slot must end by os._exit, never return to the pool
                log.error("worker_slot_crashed", worker=slot.name, error=f"{type(exc).__name__}: {exc}")
            finally:
                os._exit(code)
        slot.pid, slot.started_at, slot.restart_at = pid, time.monotonic(), None
        log.info("worker_slot_started", worker=slot.name, pid=pid)
        if self.stopping:  # the stop signal came while it was being forked
            os.kill(pid, signal.SIGTERM)

    def _reap(self) -> None:
        for slot in self.slots:
            if slot.pid is None:
                continue
            try:
                pid, status = os.waitpid(slot.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = slot.pid, 0
            if pid == 0:
                continue
            self._ended(slot, os.waitstatus_to_exitcode(status))

    def _ended(self, slot: Slot, code: int) -> None:
        now = time.monotonic()
        pid, slot.pid = slot.pid, None
        if self.stopping or (self.burst and code == 0):
            log.info("worker_slot_exited", worker=slot.name, pid=pid, code=code)
            return
        if now - slot.started_at >= defaults.SLOT_STABLE_AFTER:
            slot.delay = defaults.SLOT_RESTART_START
        slot.restart_at = now + slot.delay
        log.error("worker_slot_died", worker=slot.name, pid=pid, code=code, restart_in=slot.delay)
        slot.delay = min(defaults.SLOT_RESTART_MAX, slot.delay * 2)

    def _restart_due(self, now: float) -> None:
        for slot in self.slots:
            if not self.stopping and slot.restart_at is not None and now >= slot.restart_at:
                self._spawn(slot)

    def _kill_left(self) -> None:
        """The supervisor is leaving (its loop failed): no slot outlives it (they would by SIGKILL anyway)."""
        for slot in self.slots:
            if slot.pid is not None:
                try:
                    os.kill(slot.pid, signal.SIGKILL)
                    os.waitpid(slot.pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
                slot.pid = None
