"""Two hosts without a shared directory, for the store's end-to-end and fault tests: host A runs the
install worker on its root, host B a GPU worker (on the CPU) on another root with its own cache; both
use one S3 store (moto's server) and one Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from modelbus.events.schema import ModelAdded
from modelbus.services.client import ModelBusClient
from modelbus.services.install import InstallStatus, ModelInstallService
from modelbus.services.store import parse_store_url
from modelbus.services.store.s3 import S3BlobStore
from tests.install.conftest import REPO_ROOT, Bus, _bus
from tests.servers.s3_server import CREDENTIALS, S3Server
from tests.waiting import wait_until

TIMEOUT = 120


@dataclass
class Hosts:
    bus: Bus            # host A: the install worker, its root
    root_b: Path        # host B: GPU workers, their own root and cache
    s3: S3Server
    gpus: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def cache_b(self) -> Path:
        return self.root_b / "cache"

    def store(self) -> S3BlobStore:
        config = self.bus.config
        return S3BlobStore(parse_store_url(config.store_url), endpoint_url=config.s3_endpoint_url)

    def start_gpu(self, name: str) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "modelbus.workers", "--queues", "gpu", "--device", "cpu", "--name", name]
        log = (self.bus.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, **self.bus.env,
                                                         "MODELBUS_ROOT": str(self.root_b)},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.gpus[name] = proc
        client = ModelBusClient(self.bus.config)
        wait_until(lambda: any(w["id"] == name for w in client.workers()), 90, f"GPU worker {name} to register",
                   details=self.bus.worker_log)
        return proc

    def kill_gpu(self, name: str) -> None:
        proc = self.gpus.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop(self) -> None:
        for name in list(self.gpus):
            proc = self.gpus.pop(name)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)


def two_hosts(redis_url: str, s3: S3Server, tmp: Path, bucket: str) -> Iterator[Hosts]:
    s3.client().create_bucket(Bucket=bucket)
    tmp.mkdir(parents=True, exist_ok=True)
    env = {"MODELBUS_STORE_URL": f"s3://{bucket}/fleet", "MODELBUS_S3_ENDPOINT_URL": s3.url,
           "MODELBUS_STORE_RETRIES": "2", **CREDENTIALS}
    for bus in _bus(redis_url, tmp, start_workers=1, extra_env=env):
        root_b = tmp / "host-b"
        root_b.mkdir()
        hosts = Hosts(bus, root_b, s3)
        try:
            yield hosts
        finally:
            hosts.stop()


def install(hosts: Hosts, installer: ModelInstallService, path: Path) -> tuple[str, ModelAdded]:
    """Install ``path`` through host A's worker; the key and the ModelAdded (with its manifest)."""
    done = installer.wait_for_job(installer.heuristic_import(str(path)), timeout=TIMEOUT)
    assert done.status is InstallStatus.COMPLETED, (done.error, hosts.bus.worker_log())
    added = next(s.event for s in installer.record_store.history(done.key) if isinstance(s.event, ModelAdded))
    return str(done.key), added
