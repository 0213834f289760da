"""Helpers of the fault tests that kill, freeze and watch worker processes and their job processes."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import redis
from rq import Worker

from modelbus.events.keys import Keys
from tests.install.conftest import Bus


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (its RQ work-horse), from /proc."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def registered(bus: Bus, client: redis.Redis, name: str) -> bool:
    """Whether worker ``name`` is up and listening: it published its state (done before RQ's loop starts)
    and RQ registered it (done when the loop starts, a moment later)."""
    return bool(client.exists(Keys(bus.env["MODELBUS_NAMESPACE"]).worker_state(name))
                and client.exists(f"{Worker.redis_worker_namespace_prefix}{name}"))


def lease_token(bus: Bus, client: redis.Redis, rq_job_id: str) -> int:
    raw = client.hget(Keys(bus.env["MODELBUS_NAMESPACE"]).lease(rq_job_id), "token")
    return int(raw) if raw else 0


def log_of(bus: Bus, name: str) -> str:
    return (bus.logs / f"{name}.log").read_text(errors="replace")


def count_in_logs(bus: Bus, event: str, job_id: str) -> int:
    """How many log lines of all the bus's workers name ``event`` for the install ``job_id``."""
    return sum(1 for p in bus.logs.glob("*.log") for line in p.read_text(errors="replace").splitlines()
               if event in line and job_id in line)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """End a test's own workers (the bus is shared by the module: the next test must not meet them)."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
