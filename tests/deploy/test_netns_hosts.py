"""Workers on two "hosts" of one machine (Linux network namespaces, see tests/netns.py), a Redis and a
file server on the machine's side, installs published from the machine: nothing may rely on sharing
127.0.0.1 with Redis or a server.

Each host runs ``python -m modelbus.workers`` twice (install+hash, download) inside its namespace, reaching Redis
at its own veth address with a password, as a remote host would. The Redis listens on those addresses
only (not on loopback), so a process that quietly fell back to 127.0.0.1 fails to connect. The models
directory is shared through the filesystem (the stand-in for a shared volume); each host keeps its own
record projection, as separate hosts would. Skips where namespaces cannot be created (not root, no
``ip``, a container without CAP_NET_ADMIN, or ``MODELBUS_TEST_NO_NETNS=1``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from rq import Worker
from rq.job import Job

from modelbus.events.schema import InstallStarted
from modelbus.services.client import ModelBusClient
from modelbus.services.config import AppConfig
from tests.fixtures.model_files import make_lora_kohya
from tests.netns import Host, NetnsUnavailable, network_hosts
from tests.servers import FileServer
from tests.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "netns-secret"
HOSTS = 2
LOCAL_INSTALLS = 6
START_TIMEOUT = 40.0   # four workers importing torch at once on two cores
INSTALL_TIMEOUT = 40.0
T = TypeVar("T")


@dataclass
class Deployment:
    hosts: list[Host]
    redis_url: str              # as the machine itself reaches it (host 0's address, not loopback)
    namespace: str
    root: Path
    logs: Path
    files: FileServer
    worker_host: dict[str, int]  # worker name -> host index

    def worker_log(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.logs.glob("*.log")))


def _redis_server(hosts: list[Host], workdir: Path) -> tuple[subprocess.Popen[bytes], int] | None:
    """A redis-server bound to the hosts' machine-side addresses only (no loopback), with a password."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    with socket.socket() as s:
        s.bind((hosts[0].host_ip, 0))
        port = int(s.getsockname()[1])
    workdir.mkdir(parents=True)
    args = [binary, "--port", str(port), "--bind", *[h.host_ip for h in hosts], "--requirepass", PASSWORD,
            "--dir", str(workdir), "--appendonly", "no", "--save", "", "--maxmemory-policy", "noeviction",
            "--logfile", str(workdir / "redis.log"), "--daemonize", "no"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True), port


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _url(ip: str, port: int) -> str:
    return f"redis://:{PASSWORD}@{ip}:{port}/0"


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-2000:]
    except OSError:
        return f"({path} not written)"


def _worker_env(base: dict[str, str], redis_url: str, db_path: Path) -> dict[str, str]:
    # nothing of the test run's own modelbus/Hugging Face settings leaks into a "remote" host
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("MODELBUS_", "HF_", "CIVITAI_"))}
    return {**inherited, **base, "MODELBUS_REDIS_URL": redis_url, "MODELBUS_DB_PATH": str(db_path)}


@pytest.fixture()
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    with ExitStack() as stack:
        try:
            hosts = stack.enter_context(network_hosts(HOSTS))
        except NetnsUnavailable as exc:
            pytest.skip(f"cannot create network namespaces here: {exc}")
        started = _redis_server(hosts, tmp_path / "redis")
        if started is None:
            pytest.skip("redis-server not on PATH")
        server, port = started
        stack.callback(_stop, server)
        redis_url = _url(hosts[0].host_ip, port)
        wait_until(lambda: _pings(redis_url), 10, "redis-server on the hosts' addresses",
              lambda: _tail(tmp_path / "redis" / "redis.log"))
        files = stack.enter_context(FileServer(host=hosts[0].host_ip))

        namespace = f"test-netns-{uuid.uuid4().hex[:8]}"
        root, logs = tmp_path / "root", tmp_path / "logs"
        root.mkdir()
        logs.mkdir()
        base = {"MODELBUS_NAMESPACE": namespace, "MODELBUS_ROOT": str(root), "MODELBUS_ALLOW_PRIVATE_DOWNLOADS": "1",
                "MODELBUS_LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1", "MODELBUS_HASH_THREADS": "1",
                "MODELBUS_DOWNLOAD_RETRIES": "2", "MODELBUS_DOWNLOAD_STALL_TIMEOUT": "20",
                "MODELBUS_DOWNLOAD_CONCURRENCY": "1"}
        worker_host: dict[str, int] = {}
        for host in hosts:
            env = _worker_env(base, _url(host.host_ip, port), tmp_path / f"host{host.index}" / "records.db")
            for queues, role in (("install,hash", "ih"), ("download", "dl")):
                name = f"h{host.index}-{role}-{uuid.uuid4().hex[:4]}"
                worker_host[name] = host.index
                with (logs / f"{name}.log").open("wb") as log:  # the child keeps its own descriptor
                    host.popen([sys.executable, "-m", "modelbus.workers", "--queues", queues, "--name", name],
                               cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        # workers stop (warm) before the Redis they talk to does; the namespaces go last
        for host in reversed(hosts):
            stack.callback(host.stop_processes)
        yield Deployment(hosts, redis_url, namespace, root, logs, files, worker_host)


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def _idle_workers(conn: redis.Redis, names: set[str]) -> set[str] | None:
    """All our workers registered with RQ and blocked waiting for a job (so jobs are shared out)."""
    idle = {w.name for w in Worker.all(connection=conn) if w.name in names and w.get_state() == "idle"}
    return idle if idle == names else None


def test_workers_on_two_hosts_share_installs_and_downloads(deployment: Deployment, tmp_path: Path) -> None:
    d = deployment
    conn = redis.Redis.from_url(d.redis_url)
    for host in d.hosts:
        died = [p.args for p in host.processes if p.poll() is not None]
        assert not died, f"workers exited at start: {died}\n{d.worker_log()}"
    wait_until(lambda: _idle_workers(conn, set(d.worker_host)), START_TIMEOUT, "every worker to be idle on its queues",
          d.worker_log)
    # the workers really are elsewhere: other network namespaces, one per host, talking to Redis from
    # their hosts' own addresses
    mine = os.readlink("/proc/self/ns/net")
    theirs = {h.index: {os.readlink(f"/proc/{p.pid}/ns/net") for p in h.processes} for h in d.hosts}
    assert all(len(ns) == 1 and mine not in ns for ns in theirs.values()), (mine, theirs)
    assert len(set().union(*theirs.values())) == HOSTS
    peers = {str(c["addr"]).rsplit(":", 1)[0] for c in conn.client_list()}
    assert {h.ns_ip for h in d.hosts} <= peers, peers

    config = AppConfig.load(redis_url=d.redis_url, namespace=d.namespace, root=d.root,
                            db_path=tmp_path / "machine" / "records.db", allow_private_downloads=True)
    sources = [make_lora_kohya(tmp_path / "src" / f"lora_{i}.safetensors", rank=2 + i) for i in range(LOCAL_INSTALLS)]
    data = make_lora_kohya(tmp_path / "served.safetensors", rank=2 + LOCAL_INSTALLS).read_bytes()
    url = d.files.add_file("files/served_lora.safetensors", data)

    with ModelBusClient(config) as client:
        jobs = [client.install(str(path)) for path in sources] + [client.install(url)]
        done = [client.wait(job, timeout=INSTALL_TIMEOUT) for job in jobs]
        for job in done:
            assert job["state"] == "completed", (job, d.worker_log())
        models = client.list_models()
        assert sorted(m.key for m in models) == sorted(job["key"] for job in done)  # one record per install
        remote = next(m for m in models if m.key == done[-1]["key"])
        assert remote.source == url
        assert (config.models_path / remote.path).read_bytes() == data
        started = {s.event.aggregate_id: s.event.worker for job in done for s in client.store.history(job["id"])
                   if isinstance(s.event, InstallStarted) and s.event.worker}

    ran: dict[str, dict[str, str]] = {}
    for job in done:
        steps = {"install": job["id"], "hash": f"{job['id']}-hash"}
        if job["source"] == url:
            steps["download"] = f"{job['id']}-dl0"
        ran[job["id"]] = {step: str(Job.fetch(rq_id, connection=conn).worker_name) for step, rq_id in steps.items()}
        # the event log names the worker that took the install step, and it is the one RQ ran it on
        assert started.get(job["id"]) == ran[job["id"]]["install"], (started, ran)

    print("\nhosts: " + ", ".join(f"h{h.index}={h.netns} ({h.ns_ip} -> machine {h.host_ip})" for h in d.hosts))
    for job in done:
        where = "  ".join(f"{step}@{name} (host {d.worker_host.get(name, '?')})" for step, name in ran[job["id"]].items())
        print(f"{Path(job['source']).name:24} {where}")

    workers = {name for steps in ran.values() for name in steps.values()}
    assert workers <= set(d.worker_host), f"jobs run by workers this test did not start: {workers - set(d.worker_host)}"
    assert {d.worker_host[name] for name in workers} == set(range(HOSTS)), f"not every host worked: {ran}"
    download_worker = ran[done[-1]["id"]]["download"]
    assert "-dl-" in download_worker  # a download worker, inside a namespace, fetched it over the veth link
    assert any(r.path == "/files/served_lora.safetensors" and r.method == "GET" for r in d.files.requests)


ENSURE = "import sys; from events.embedded import EmbeddedRedis; print(EmbeddedRedis.ensure(sys.argv[1]).url)"


def test_a_host_without_redis_url_refuses_to_double_the_machines_embedded_redis(tmp_path: Path) -> None:
    """A namespaced host sharing the machine's root but given no MODELBUS_REDIS_URL cannot reach the
    machine's embedded Redis (it listens on the machine's loopback): it must say so, not start a second
    server on the same data directory."""
    from modelbus.events.embedded import EmbeddedRedis

    root = tmp_path / "root"
    server = EmbeddedRedis.ensure(root)
    try:
        with network_hosts(1) as hosts:
            env = _worker_env({}, "", tmp_path / "unused.db")
            env.pop("MODELBUS_REDIS_URL")
            done = hosts[0].run([sys.executable, "-c", ENSURE, str(root)], cwd=REPO_ROOT, env=env, timeout=60)
        assert done.returncode != 0, done.stdout
        assert "EmbeddedRedisError" in done.stderr and "MODELBUS_REDIS_URL" in done.stderr, done.stderr
        assert redis.Redis.from_url(server.url).ping(), "the machine's server is untouched"
        print("\na namespaced host with the machine's root and no Redis URL: refused, no second server")
    except NetnsUnavailable as exc:
        pytest.skip(f"cannot create network namespaces here: {exc}")
    finally:
        server.stop()
