"""Fixtures of the install tests: a bus (namespace + root + environment) shared by a module, with real
worker processes (``python -m modelbus.workers``) and real HTTP servers (files, Hugging Face, Civitai) on loopback.

Starting a worker process costs seconds (it imports torch for identification), so a module shares
one bus and its workers instead of starting burst workers per test; tests use distinct model files,
so they do not see each other's models.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from modelbus.events.store import RedisEventStore
from modelbus.services.config import AppConfig
from modelbus.services.install import ModelInstallService
from tests.servers import CivitaiServer, FileServer, HFServer

REPO_ROOT = Path(__file__).resolve().parents[2]
# The job modules are imported once in the worker's main process, so the forked job processes inherit
# them instead of importing torch again for every job (MODELBUS_TEST_PLAIN_WORKERS=1: plain
# ``python -m modelbus.workers``, which is correct but pays that import in every job).
WORKER_MAIN = ("import sys, workers.install, workers.download, workers.hash; "
               "from workers.__main__ import main; sys.exit(main(sys.argv[1:]))")


@dataclass
class Bus:
    """One namespace, root and environment, the servers, and the worker processes running on them."""

    env: dict[str, str]
    root: Path
    logs: Path
    files: FileServer
    hub: HFServer
    civitai: CivitaiServer
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def library(self) -> Path:
        """An import root of this bus beside the defaults (models dir, import area): in place models live here."""
        path = self.root.parent / "library"
        path.mkdir(exist_ok=True)
        return path

    @property
    def config(self) -> AppConfig:
        return AppConfig.load(root=self.root)

    def start_worker(self, queues: str = "install,download,hash", burst: bool = False,
                     name: str | None = None, concurrency: int = 1) -> subprocess.Popen[bytes]:
        name = name or f"w-{uuid.uuid4().hex[:6]}"
        entry = ["-m", "modelbus.workers"] if os.environ.get("MODELBUS_TEST_PLAIN_WORKERS") else ["-c", WORKER_MAIN]
        cmd = [sys.executable, *entry, "--queues", queues, "--name", name, "--concurrency", str(concurrency)]
        if burst:
            cmd.append("--burst")
        log = (self.logs / f"{name}.log").open("wb")
        # a session of its own: a test can kill the worker and the job process it forked together
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, **self.env}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the worker and its job process: what a machine dying looks like to the others."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)

    def worker_log(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in sorted(self.logs.glob("*.log")))


def _bus(redis_url: str, tmp: Path, start_workers: int, extra_env: dict[str, str] | None = None) -> Iterator[Bus]:
    namespace = f"test-install-{uuid.uuid4().hex[:10]}"
    root = tmp / "root"
    logs = tmp / "logs"
    root.mkdir()
    logs.mkdir()
    with FileServer() as files, HFServer() as hub, CivitaiServer() as civitai:
        env = {
            "MODELBUS_REDIS_URL": redis_url, "MODELBUS_NAMESPACE": namespace, "MODELBUS_ROOT": str(root),
            "MODELBUS_ALLOW_PRIVATE_DOWNLOADS": "1", "MODELBUS_LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1",
            "MODELBUS_HF_ENDPOINT": hub.url, "MODELBUS_CIVITAI_API": civitai.url, "MODELBUS_HASH_THREADS": "1",
            "MODELBUS_DOWNLOAD_RETRIES": "2", "MODELBUS_DOWNLOAD_STALL_TIMEOUT": "20",
            "MODELBUS_STORE_URL": "shared", "MODELBUS_DOWNLOAD_CONCURRENCY": "1", **(extra_env or {}),
            "MODELBUS_IMPORT_ROOTS": str(tmp / "library"),  # an operator's folder for in-place models
        }
        bus = Bus(env, root, logs, files, hub, civitai)
        with pytest.MonkeyPatch.context() as mp:
            for name in ("HF_TOKEN", "CIVITAI_TOKEN", "HF_ENDPOINT"):
                mp.delenv(name, raising=False)
            for name, value in env.items():
                mp.setenv(name, value)
            for _ in range(start_workers):
                bus.start_worker()
            try:
                yield bus
            finally:
                bus.stop()
                _drop_namespace(redis_url, namespace)


def _drop_namespace(redis_url: str, namespace: str) -> None:
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"*{{{namespace}}}*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i:i + 500])


@pytest.fixture(scope="module")
def bus(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    """A bus with one long-running worker on the install, download and hash queues."""
    yield from _bus(redis_url, tmp_path_factory.mktemp("install-bus"), start_workers=1)


@pytest.fixture(scope="module")
def idle_bus(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    """A bus without workers: tests start (and kill) their own."""
    yield from _bus(redis_url, tmp_path_factory.mktemp("install-idle-bus"), start_workers=0)


def make_service(bus: Bus) -> ModelInstallService:
    config = bus.config
    return ModelInstallService(config, event_store=RedisEventStore.from_config(config))


@pytest.fixture()
def installer(bus: Bus) -> Iterator[ModelInstallService]:
    service = make_service(bus)
    yield service
    service.record_store.close()


@pytest.fixture()
def local_service(app_config: AppConfig, event_store: RedisEventStore) -> Iterator[ModelInstallService]:
    """The install service in this process (register_path / install_path), on the test's Redis and root."""
    svc = ModelInstallService(app_config, event_store=event_store)
    yield svc
    svc.record_store.close()
