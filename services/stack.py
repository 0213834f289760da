"""``modelbus up``: the whole stack in the foreground — the Redis (embedded unless configured), one worker
process per queue, and the HTTP API when it is available. Ctrl-C stops them all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from events.store import RedisEventStore
from services.config import AppConfig
from workers.process import die_with_parent

log = structlog.get_logger(__name__)

DEFAULT_WORKERS = ("install", "download", "hash", "gpu")


@dataclass
class Stack:
    config: AppConfig
    worker_queues: Sequence[str] = DEFAULT_WORKERS
    with_api: bool = True
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    redis_url: str = ""

    def start(self) -> None:
        store = RedisEventStore.from_config(self.config)  # starts the embedded Redis when none is configured
        self.redis_url = store.url or ""
        env = dict(os.environ, MODELBUS_REDIS_URL=self.redis_url, MODELBUS_NAMESPACE=self.config.namespace,
                   MODELBUS_ROOT=str(self.config.root))
        for queues in self.worker_queues:
            cmd = [sys.executable, "-m", "workers", "--queues", queues]
            self.processes.append(_spawn(cmd, env))
        if self.with_api and _api_available():
            cmd = [sys.executable, "-m", "uvicorn", "services.api:create_app", "--factory",
                   "--host", self.config.api_host, "--port", str(self.config.api_port), "--log-level", "warning"]
            self.processes.append(_spawn(cmd, env))

    def describe(self) -> list[str]:
        lines = [f"redis:     {self.redis_url} (namespace {self.config.namespace})",
                 f"root:      {self.config.root}",
                 f"workers:   {', '.join(self.worker_queues)} ({len(self.worker_queues)} processes)"]
        if self.with_api and _api_available():
            lines.append(f"api:       http://{self.config.api_host}:{self.config.api_port}/api/v2/models")
        return lines

    def wait(self) -> int:
        """Block until Ctrl-C/SIGTERM or until a process dies; then stop everything."""
        stop = {"flag": False}

        def _handler(signum: int, frame: object) -> None:
            stop["flag"] = True

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)  # also when started in the background (SIGINT inherited as ignored)
        try:
            while not stop["flag"]:
                dead = [p for p in self.processes if p.poll() is not None]
                if dead:
                    log.error("stack_process_exited", pid=dead[0].pid, code=dead[0].returncode, args=dead[0].args)
                    return 1
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
        return 0

    def stop(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in self.processes:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when `modelbus up` dies, even by SIGKILL (no orphaned workers)."""
    die_with_parent(signal.SIGTERM)


def _spawn(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    # preexec_fn is the only way to PR_SET_PDEATHSIG (Popen has no option for it); the function makes one
    # async-signal-safe system call, which is what the warning about threads asks of it
    return subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)  # noqa: PLW1509


def _api_available() -> bool:
    try:
        import services.api  # noqa: F401
    except ImportError:
        return False
    return True
