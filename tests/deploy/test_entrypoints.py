"""The Redis start-up scripts of the Sentinel variant (deploy/redis/*.sh), run for real with the local
``redis-server``: a first start builds the initial topology, and a primary restarted after a failover
comes back as a replica of the new primary instead of a second primary."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from modelbus.events.embedded import free_port
from tests.waiting import wait_until

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PASSWORD = "node-secret"
SENTINEL_PASSWORD = "sentinel-secret"

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
                                reason="redis-server/redis-cli not on PATH")


class Processes:
    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def run(self, script: str, workdir: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        workdir.mkdir(parents=True, exist_ok=True)
        full = {"PATH": os.environ["PATH"], **env}
        with open(workdir / "out.log", "ab") as log:  # the child keeps its own copy of the descriptor
            process = subprocess.Popen(["sh", str(DEPLOY / "redis" / script)], cwd=workdir, env=full,
                                       stdout=log, stderr=subprocess.STDOUT)
        self.started.append(process)
        return process

    def stop(self) -> None:
        for p in self.started:
            if p.poll() is None:
                p.terminate()
        for p in self.started:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)


@pytest.fixture()
def procs() -> Iterator[Processes]:
    p = Processes()
    yield p
    p.stop()


def _template(tmp: Path) -> Path:
    # the shipped redis.conf, bound to loopback for the test (a later directive wins)
    conf = tmp / "template.conf"
    conf.write_text((DEPLOY / "redis" / "redis.conf").read_text() + "\nbind 127.0.0.1\nrepl-diskless-sync-delay 0\n")
    return conf


def _client(port: int, password: str = PASSWORD) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=2, socket_connect_timeout=2)


def _wait(check: Callable[[], bool], timeout: float, what: str, logs: Path) -> None:
    def tails() -> str:
        return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted(logs.rglob("*.log")))
    wait_until(check, timeout, what, tails, interval=0.1, ignore=(redis.RedisError,))


def _role(port: int) -> tuple[str, int | None]:
    reply = _client(port).execute_command("ROLE")
    role = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
    return role, (int(reply[2]) if role == "slave" else None)


def test_restarted_primary_rejoins_as_replica_of_the_promoted_one(tmp_path: Path, procs: Processes) -> None:
    template = _template(tmp_path)
    p_port, r_port, s_port = free_port(), free_port(), free_port()
    sentinels = f"127.0.0.1:{s_port}"

    def node(name: str, port: int, **extra: str) -> subprocess.Popen[bytes]:
        env = {"REDIS_PASSWORD": PASSWORD, "REDIS_PORT": str(port), "REDIS_CONF_TEMPLATE": str(template),
               "REDIS_CONF": str(tmp_path / name / "redis.conf"), "SENTINEL_HOSTS": sentinels,
               "SENTINEL_SERVICE": "modelbus", "SENTINEL_PASSWORD": SENTINEL_PASSWORD, **extra}
        return procs.run("ha-entrypoint.sh", tmp_path / name, env)

    # first start: no sentinel answers yet, so the static topology applies
    primary = node("primary", p_port, REDIS_REPLICA_OF=f"127.0.0.1:{p_port}")  # its own address: primary
    _wait(lambda: _role(p_port) == ("master", None), 10, "the initial primary", tmp_path)
    node("replica", r_port, REDIS_REPLICA_OF=f"127.0.0.1:{p_port}")
    _wait(lambda: _role(r_port) == ("slave", p_port)
          and _client(r_port).info("replication")["master_link_status"] == "up", 15, "the replica", tmp_path)

    sentinel_env = {"REDIS_PASSWORD": PASSWORD, "SENTINEL_PASSWORD": SENTINEL_PASSWORD,
                    "SENTINEL_PRIMARY": f"127.0.0.1:{p_port}", "SENTINEL_QUORUM": "1",
                    "SENTINEL_PORT": str(s_port), "SENTINEL_CONF": str(tmp_path / "sentinel" / "sentinel.conf"),
                    "SENTINEL_DOWN_AFTER_MS": "2000", "SENTINEL_FAILOVER_TIMEOUT_MS": "4000"}
    sentinel = procs.run("sentinel-entrypoint.sh", tmp_path / "sentinel", sentinel_env)
    sentinel_client = _client(s_port, SENTINEL_PASSWORD)

    def sentinel_primary() -> int:
        return int(sentinel_client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "modelbus")[1])

    def sentinel_knows_replica() -> bool:
        return len(sentinel_client.execute_command("SENTINEL", "REPLICAS", "modelbus")) == 1

    _wait(sentinel_knows_replica, 15, "the sentinel to find the replica", tmp_path)
    _client(p_port).set("written-before-failover", "1")
    _client(p_port).execute_command("WAIT", 1, 2000)

    primary.send_signal(signal.SIGKILL)  # sh exec'ed redis-server: this is the server itself
    primary.wait(timeout=5)
    _wait(lambda: sentinel_primary() == r_port and _role(r_port)[0] == "master", 30, "the failover", tmp_path)

    # the old primary restarts with the same static settings, but the sentinel now names r_port
    node("primary", p_port, REDIS_REPLICA_OF=f"127.0.0.1:{p_port}")
    _wait(lambda: _role(p_port) == ("slave", r_port)
          and _client(p_port).info("replication")["master_link_status"] == "up", 20,
          "the old primary to follow the new one", tmp_path)
    assert _client(p_port).get("written-before-failover") == b"1"
    log = (tmp_path / "primary" / "out.log").read_text()
    assert f"sentinels name 127.0.0.1:{r_port} as primary" in log

    # a restarted sentinel keeps what it learned: its rewritten config names the new primary
    sentinel.terminate()
    sentinel.wait(timeout=5)
    procs.run("sentinel-entrypoint.sh", tmp_path / "sentinel", sentinel_env)
    _wait(lambda: sentinel_primary() == r_port, 10, "the restarted sentinel", tmp_path)


def test_sentinel_template_is_a_valid_sentinel_config(tmp_path: Path, procs: Processes) -> None:
    port = free_port()
    text = (DEPLOY / "redis" / "sentinel.conf").read_text().replace("port 26379", f"port {port}\nbind 127.0.0.1")
    conf = tmp_path / "sentinel.conf"
    conf.write_text(text)
    process = subprocess.Popen(["redis-server", str(conf), "--sentinel"], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.started.append(process)
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
    _wait(lambda: bool(client.ping()), 10, "the sentinel", tmp_path)
    master = client.execute_command("SENTINEL", "MASTER", "modelbus")
    fields = dict(zip(master[::2], master[1::2])) if isinstance(master, list) else master
    fields = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
              for k, v in fields.items()}
    assert fields["quorum"] == "2" and fields["down-after-milliseconds"] == "5000"
    assert fields["failover-timeout"] == "60000"


def test_scripts_refuse_to_start_without_a_password(tmp_path: Path) -> None:
    for script in ("ha-entrypoint.sh", "sentinel-entrypoint.sh"):
        done = subprocess.run(["sh", str(DEPLOY / "redis" / script)], check=False, cwd=tmp_path, capture_output=True,
                              text=True, env={"PATH": os.environ["PATH"], "SENTINEL_PRIMARY": "x"}, timeout=10)
        assert done.returncode != 0 and "REDIS_PASSWORD must be set" in done.stderr
