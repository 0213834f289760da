"""``modelbus up``: the whole stack in the foreground — the Redis (embedded unless configured), one worker
process per queue, and the HTTP API when it is available. Ctrl-C stops them all.

``up`` supervises what it started, as systemd's ``Restart=on-failure`` or a Kubernetes pod's restart
policy do: a worker, the API or the embedded Redis that dies is logged (exit code or signal) and started
again, after a delay that doubles with each quick death (``RESTART_BACKOFF_*``) and is forgotten once
the process has run for ``RESTART_STABLE_AFTER`` s. The embedded Redis comes back on its own port, so
the workers and every follower reconnect by themselves.

The API runs as ``api_workers`` processes (``MODELBUS_API_WORKERS``) that share one listening socket,
bound here before any of them starts (as gunicorn's arbiter does): the kernel hands each connection to
one of them, a process that dies is restarted like any other, and the others keep answering meanwhile.
A port that is taken is one clear error before anything starts. Their HTTP metrics are summed across
them (prometheus_client's multiprocess mode, in ``<root>/run/api-metrics``), and the per-client limit on
event streams is counted in Redis, so every limit holds for the whole API, not per process.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from modelbus.events.embedded import EmbeddedRedis
from modelbus.events.errors import Conflict
from modelbus.events.logs import get_logger
from modelbus.events.store import RedisEventStore
from modelbus.services.config import AppConfig
from modelbus.services.process import die_with_parent

log = get_logger(__name__)

DEFAULT_WORKERS = ("install", "download", "hash", "gpu")
RESTART_BACKOFF_START = 1.0   # s; the first restart of a process that died
RESTART_BACKOFF_MAX = 30.0    # s; the delay doubles with each quick death up to this
RESTART_STABLE_AFTER = 60.0   # s; a process that ran this long before it died restarts at once again
POLL_INTERVAL = 0.5           # s
LISTEN_BACKLOG = 2048         # connections the API's socket queues before its processes accept them


class ApiAddressError(Conflict):
    """The API's address is taken by another program (``modelbus up`` stops before it starts anything)."""


@dataclass
class Supervised:
    """One process ``up`` started, and when to start it again if it died."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    pass_fds: tuple[int, ...] = ()
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    delay: float = RESTART_BACKOFF_START
    restart_at: float | None = None
    restarts: int = 0

    def spawn(self) -> None:
        self.process = _spawn(self.cmd, self.env, self.pass_fds)
        self.started_at, self.restart_at = time.monotonic(), None

    def check(self, now: float) -> None:
        """Notice a death (log it, schedule the restart) or start the process again when it is due."""
        if self.restart_at is not None:
            if now >= self.restart_at:
                self.spawn()
                self.restarts += 1
                log.warning("stack_process_restarted", name=self.name, pid=self.process.pid if self.process else None,
                            restarts=self.restarts)
            return
        if self.process is None or self.process.poll() is None:
            return
        code = self.process.returncode
        if now - self.started_at >= RESTART_STABLE_AFTER:
            self.delay = RESTART_BACKOFF_START
        self.restart_at = now + self.delay
        log.error("stack_process_exited", name=self.name, pid=self.process.pid, code=code,
                  reason=_why(code), restart_in=self.delay)
        self.delay = min(RESTART_BACKOFF_MAX, self.delay * 2)


@dataclass
class Stack:
    config: AppConfig
    worker_queues: Sequence[str] = DEFAULT_WORKERS
    with_api: bool = True
    supervised: list[Supervised] = field(default_factory=list)
    redis_url: str = ""
    redis: EmbeddedRedis | None = None  # the embedded server, when this process started it
    api_socket: socket.socket | None = None  # the API processes' shared listening socket

    @property
    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [s.process for s in self.supervised if s.process is not None]

    def start(self) -> None:
        serve_api = self.with_api and _api_available()
        if serve_api:  # before Redis and the workers: a taken port is an error with nothing to clean up
            self.api_socket = _listen(self.config.api_host, self.config.api_port)
        store = RedisEventStore.from_config(self.config)  # starts the embedded Redis when none is configured
        self.redis_url = store.url or ""
        if not self.config.redis_url:
            embedded = EmbeddedRedis.ensure(self.config.root)
            self.redis = embedded if embedded.process is not None else None
        env = dict(os.environ, MODELBUS_REDIS_URL=self.redis_url, MODELBUS_NAMESPACE=self.config.namespace,
                   MODELBUS_ROOT=str(self.config.root))
        for queues in self.worker_queues:
            self._add(f"worker {queues}", [sys.executable, "-m", "modelbus.workers", "--queues", queues], env)
        if serve_api and self.api_socket is not None:
            self._add_api(self.api_socket, env)

    def _add_api(self, sock: socket.socket, env: dict[str, str]) -> None:
        count = self.config.api_workers
        api_env = dict(env)
        if count > 1:  # one set of HTTP metrics for all of them, files in a folder of this run's own
            metrics = self.config.root / "run" / "api-metrics"
            shutil.rmtree(metrics, ignore_errors=True)
            metrics.mkdir(parents=True)
            api_env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
        # no proxy headers: a client's address is the socket's (uvicorn would otherwise take X-Forwarded-For
        # from any local process, which could then pose as any number of clients to the per-client limits)
        cmd = [sys.executable, "-m", "uvicorn", "modelbus.services.api:create_app", "--factory",
               "--fd", str(sock.fileno()), "--log-level", "warning", "--no-proxy-headers"]
        for i in range(count):
            self._add("api" if count == 1 else f"api-{i}", cmd, api_env, (sock.fileno(),))

    @property
    def api_port(self) -> int:
        """The port the API listens on (the configured one, or the one the kernel chose for port 0)."""
        return int(self.api_socket.getsockname()[1]) if self.api_socket is not None else self.config.api_port

    def _add(self, name: str, cmd: list[str], env: dict[str, str], pass_fds: tuple[int, ...] = ()) -> None:
        entry = Supervised(name, cmd, env, pass_fds)
        entry.spawn()
        self.supervised.append(entry)

    def describe(self) -> list[str]:
        lines = [f"redis:     {self.redis_url} (namespace {self.config.namespace})",
                 f"root:      {self.config.root}",
                 f"workers:   {', '.join(self.worker_queues)} ({len(self.worker_queues)} processes)"]
        if self.api_socket is not None:
            host = self.config.api_host
            shown = f"[{host}]" if ":" in host else host
            processes = self.config.api_workers
            lines.append(f"api:       http://{shown}:{self.api_port}/api/v2/models "
                         f"({processes} process{'es' if processes > 1 else ''})")
        return lines

    def wait(self) -> int:
        """Block until Ctrl-C/SIGTERM, restarting what dies; then stop everything."""
        stop = {"flag": False}

        def _handler(signum: int, frame: object) -> None:
            stop["flag"] = True

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)  # also when started in the background (SIGINT inherited as ignored)
        redis_delay = RESTART_BACKOFF_START
        try:
            while not stop["flag"]:
                now = time.monotonic()
                if self.redis is not None and self.redis.process is not None and self.redis.process.poll() is not None:
                    redis_delay = self._restart_redis(redis_delay)
                for entry in self.supervised:
                    entry.check(now)
                time.sleep(POLL_INTERVAL)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
        return 0

    def _restart_redis(self, delay: float) -> float:
        assert self.redis is not None and self.redis.process is not None
        code = self.redis.process.returncode
        log.error("stack_redis_exited", url=self.redis.url, code=code, reason=_why(code), restart_in=delay)
        time.sleep(delay)
        try:
            self.redis.restart()
        except Exception as exc:  # noqa: BLE001 - keep supervising: the next round tries again
            log.error("stack_redis_not_restarted", error=str(exc))
            return min(RESTART_BACKOFF_MAX, delay * 2)
        log.warning("stack_redis_restarted", url=self.redis.url, pid=self.redis.process.pid)
        return RESTART_BACKOFF_START

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
        if self.api_socket is not None:
            self.api_socket.close()
            self.api_socket = None


def _why(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when `modelbus up` dies, even by SIGKILL (no orphaned workers)."""
    die_with_parent(signal.SIGTERM)


def _spawn(cmd: list[str], env: dict[str, str], pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    # preexec_fn is the only way to PR_SET_PDEATHSIG (Popen has no option for it); the function makes one
    # async-signal-safe system call, which is what the warning about threads asks of it
    return subprocess.Popen(cmd, env=env, pass_fds=pass_fds, preexec_fn=_die_with_parent)  # noqa: PLW1509


def _listen(host: str, port: int) -> socket.socket:
    """The API's listening socket, shared by its processes (``--fd``); a taken port is ApiAddressError."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    except socket.gaierror as exc:
        raise ApiAddressError(f"cannot serve the API on {host!r}: {exc.strerror} (MODELBUS_API_HOST)") from exc
    try:
        sock = socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ApiAddressError(f"cannot serve the API on {host}:{port}: {reason} (another program holds it? set "
                              "MODELBUS_API_PORT)") from exc
    sock.set_inheritable(True)
    return sock


def _api_available() -> bool:
    try:
        import modelbus.services.api  # noqa: F401
    except ImportError:
        return False
    return True
