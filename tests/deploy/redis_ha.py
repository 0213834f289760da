"""A real Redis primary with replicas and one Sentinel on loopback, for failover tests.

Every process is a ``redis-server`` started here on a free port in a temporary directory; ``stop()``
ends exactly the processes this harness started. Timings are short (down-after 2 s) so that a
failover completes in a few seconds.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from modelbus.events.embedded import free_port
from tests.waiting import wait_until

SERVICE = "mymaster"


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


@dataclass
class Node:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def client(self, password: str | None = None) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=password, socket_timeout=2,
                           socket_connect_timeout=2)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class RedisHA:
    workdir: Path
    replicas: int = 1
    password: str | None = None            # requirepass/masterauth of the data nodes
    sentinel_password: str | None = None   # requirepass of the sentinel itself
    down_after_ms: int = 2000
    failover_timeout_ms: int = 4000
    primary: Node | None = None
    replica_nodes: list[Node] = field(default_factory=list)
    sentinel: Node | None = None

    @property
    def url(self) -> str:
        assert self.sentinel is not None
        creds = f":{self.password}@" if self.password else ""
        query = f"?sentinel_password={self.sentinel_password}" if self.sentinel_password else ""
        return f"redis+sentinel://{creds}127.0.0.1:{self.sentinel.port}/{SERVICE}{query}"

    def start(self, timeout: float = 20.0) -> RedisHA:
        binary = redis_server_binary()
        assert binary, "redis-server not on PATH"
        self.primary = self._data_node(binary, "primary", replica_of=None)
        for i in range(self.replicas):
            self.replica_nodes.append(self._data_node(binary, f"replica{i}", replica_of=self.primary.port))
        self._wait(lambda: all(self._link_up(n) for n in self.replica_nodes), timeout, "replicas in sync")
        self.sentinel = self._sentinel_node(binary)
        self._wait(self._sentinel_sees_everyone, timeout, "sentinel discovering the replicas")
        return self

    def _data_node(self, binary: str, name: str, replica_of: int | None) -> Node:
        port = free_port()
        data = self.workdir / name
        data.mkdir(parents=True)
        log = data / "redis.log"
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--save", "",
                "--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction",
                "--repl-diskless-sync-delay", "0", "--logfile", str(log), "--daemonize", "no"]
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        node = Node(name, port, subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), log)
        self._wait(lambda: self._answers(node, self.password), 10, f"{name} to answer")
        return node

    def _sentinel_node(self, binary: str) -> Node:
        assert self.primary is not None
        port = free_port()
        data = self.workdir / "sentinel"
        data.mkdir(parents=True)
        log = data / "sentinel.log"
        lines = [f"port {port}", "bind 127.0.0.1", f"dir {data}", f"logfile {log}", "daemonize no",
                 f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 1",
                 f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}",
                 f"sentinel failover-timeout {SERVICE} {self.failover_timeout_ms}",
                 f"sentinel parallel-syncs {SERVICE} {max(1, self.replicas)}"]
        if self.password:
            lines.append(f"sentinel auth-pass {SERVICE} {self.password}")
        if self.sentinel_password:
            lines.append(f"requirepass {self.sentinel_password}")
        conf = data / "sentinel.conf"  # sentinel rewrites its config file: it must be writable
        conf.write_text("\n".join(lines) + "\n")
        process = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        node = Node("sentinel", port, process, log)
        self._wait(lambda: self._answers(node, self.sentinel_password), 10, "sentinel to answer")
        return node

    def sentinel_client(self) -> redis.Redis:
        assert self.sentinel is not None
        return self.sentinel.client(self.sentinel_password)

    def primary_port(self) -> int:
        """The primary's port as the sentinel reports it now."""
        reply = self.sentinel_client().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return int(reply[1])

    def kill_primary(self) -> Node:
        """SIGKILL the current primary: no shutdown, no final fsync, no goodbye to the replicas."""
        assert self.primary is not None
        old = self.primary
        old.process.send_signal(signal.SIGKILL)
        old.process.wait(timeout=10)
        return old

    def wait_for_promotion(self, timeout: float = 30.0) -> Node:
        """Wait until the sentinel names a replica as primary and that replica says it is one."""
        assert self.primary is not None
        old_port = self.primary.port
        by_port = {n.port: n for n in self.replica_nodes}

        def promoted() -> bool:
            try:
                port = self.primary_port()
            except redis.RedisError:
                return False
            node = by_port.get(port)
            if node is None or port == old_port:
                return False
            role = node.client(self.password).execute_command("ROLE")[0]
            return bool(role in (b"master", "master"))

        self._wait(promoted, timeout, "a replica to be promoted")
        new = by_port[self.primary_port()]
        self.replica_nodes.remove(new)
        self.replica_nodes.append(self.primary)
        self.primary = new
        return new

    def live_primaries(self) -> list[int]:
        """Ports of the running data nodes that say they are a primary (more than one: split brain)."""
        found = []
        for node in (self.primary, *self.replica_nodes):
            if node is not None and node.process.poll() is None:
                role = node.client(self.password).execute_command("ROLE")[0]
                if role in (b"master", "master"):
                    found.append(node.port)
        return found

    def stop(self) -> None:
        nodes = [n for n in (self.sentinel, self.primary, *self.replica_nodes) if n is not None]
        for node in nodes:
            if node.process.poll() is None:
                node.process.terminate()
        for node in nodes:
            try:
                node.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(timeout=5)

    def logs(self) -> str:
        nodes = [n for n in (self.sentinel, self.primary, *self.replica_nodes) if n is not None]
        return "\n".join(f"--- {n.name} (port {n.port})\n{n.log_tail()}" for n in nodes)

    # --- waiting ---------------------------------------------------------------------------------

    @staticmethod
    def _answers(node: Node, password: str | None) -> bool:
        if node.process.poll() is not None:
            raise RuntimeError(f"{node.name} exited with {node.process.returncode}:\n{node.log_tail()}")
        try:
            return bool(node.client(password).ping())
        except redis.RedisError:
            return False

    def _link_up(self, node: Node) -> bool:
        try:
            info = node.client(self.password).info("replication")
        except redis.RedisError:
            return False
        return info.get("master_link_status") == "up"

    def _sentinel_sees_everyone(self) -> bool:
        try:
            found = self.sentinel_client().execute_command("SENTINEL", "REPLICAS", SERVICE)
        except redis.RedisError:
            return False
        healthy = 0
        for entry in found:
            fields = _pairs(entry)
            flags = fields.get("flags", "")
            if "disconnected" not in flags and "s_down" not in flags and fields.get("master-link-status") == "ok":
                healthy += 1
        return healthy == self.replicas

    def _wait(self, check: Callable[[], object], timeout: float, what: str) -> None:
        wait_until(check, timeout, what, self.logs, interval=0.1)


def _pairs(entry: object) -> dict[str, str]:
    """SENTINEL REPLICAS answers a flat list [k, v, k, v...] per replica (or a dict under RESP3)."""
    if isinstance(entry, dict):
        items = list(entry.items())
    else:
        flat = list(entry)  # type: ignore[call-overload]
        items = list(zip(flat[::2], flat[1::2]))
    return {(k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes) else str(v))
            for k, v in items}
