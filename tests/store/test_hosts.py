"""Two hosts without a shared directory: each its own MODELBUS_ROOT and cache, one S3 store. A model
installed by host A's install worker is loaded by host B's GPU worker, which fetches it first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from events.schema import ModelAdded
from services import routing
from services.client import ModelBusClient
from services.client.errors import JobFailedError
from services.install import InstallStatus, ModelInstallService
from services.store import parse_store_url
from services.store.s3 import S3BlobStore
from tests.fixtures.model_files import make_lora_kohya
from tests.install.conftest import REPO_ROOT, Bus, _bus, make_service
from tests.servers.s3_server import CREDENTIALS, S3Server
from tests.waiting import wait_until

TIMEOUT = 120


@dataclass
class Hosts:
    bus: Bus            # host A: the install worker, its root
    root_b: Path        # host B: a GPU worker, its own root and cache
    gpu: subprocess.Popen[bytes]
    s3: S3Server

    @property
    def cache_b(self) -> Path:
        return self.root_b / "cache"

    def store(self) -> S3BlobStore:
        config = self.bus.config
        return S3BlobStore(parse_store_url(config.store_url), endpoint_url=config.s3_endpoint_url)


def start_gpu(bus: Bus, root: Path, name: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "workers", "--queues", "gpu", "--device", "cpu", "--name", name]
    log = (bus.logs / f"{name}.log").open("wb")
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, **bus.env, "MODELBUS_ROOT": str(root)},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_registered(bus: Bus, name: str) -> None:
    client = ModelBusClient(bus.config)
    wait_until(lambda: any(w["id"] == name for w in client.workers()), 90, f"GPU worker {name} to register",
               details=bus.worker_log)


@pytest.fixture(scope="module")
def hosts(redis_url: str, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    s3_server.client().create_bucket(Bucket="two-hosts")
    env = {"MODELBUS_STORE_URL": "s3://two-hosts/fleet", "MODELBUS_S3_ENDPOINT_URL": s3_server.url,
           "MODELBUS_STORE_RETRIES": "2", **CREDENTIALS}
    tmp = tmp_path_factory.mktemp("hosts")
    for bus in _bus(redis_url, tmp, start_workers=1, extra_env=env):
        root_b = tmp / "host-b"
        root_b.mkdir()
        gpu = start_gpu(bus, root_b, "gpu-b")
        try:
            wait_registered(bus, "gpu-b")
            yield Hosts(bus, root_b, gpu, s3_server)
        finally:
            if gpu.poll() is None:
                os.killpg(gpu.pid, signal.SIGTERM)
                gpu.wait(timeout=20)


@pytest.fixture()
def installer(hosts: Hosts) -> Iterator[ModelInstallService]:
    service = make_service(hosts.bus)
    yield service
    service.record_store.close()


def _install(hosts: Hosts, installer: ModelInstallService, path: Path) -> tuple[str, ModelAdded]:
    done = installer.wait_for_job(installer.heuristic_import(str(path)), timeout=TIMEOUT)
    assert done.status is InstallStatus.COMPLETED, (done.error, hosts.bus.worker_log())
    added = next(s.event for s in installer.record_store.history(done.key) if isinstance(s.event, ModelAdded))
    return str(done.key), added


def test_a_model_installed_on_one_host_is_loaded_on_another(hosts: Hosts, installer: ModelInstallService,
                                                             tmp_path: Path) -> None:
    source = make_lora_kohya(tmp_path / "travelling_lora.safetensors", rank=16)
    key, added = _install(hosts, installer, source)
    assert not (hosts.root_b / "models").exists() or not list((hosts.root_b / "models").rglob("*.safetensors"))
    client = ModelBusClient(hosts.bus.config)
    placed = client.load(key, timeout=TIMEOUT)
    assert placed["worker"] == "gpu-b"
    laid = hosts.cache_b / "models" / key / "travelling_lora.safetensors"
    assert laid.read_bytes() == source.read_bytes()
    assert laid.stat().st_ino == (hosts.cache_b / "blobs" / added.files[0].blake3).stat().st_ino
    kinds = [d.event.payload for d in client.events(types=["model_fetch_started", "model_fetch_completed"])
             if d.event.payload["model_key"] == key]  # type: ignore[attr-defined]
    assert len(kinds) == 2
    assert kinds[1]["bytes"] == source.stat().st_size
    # the heartbeat says what host B holds on disk: routing's disk affinity
    wait_until(lambda: any(key in w.get("disk_models", []) for w in client.workers()), 30,
               "gpu-b's heartbeat to list the model on disk")
    states = routing.worker_states(client.redis, hosts.bus.config.namespace)
    assert routing.choose_gpu_worker([{**s, "models": []} for s in states], key) == "gpu-b"


def test_a_corrupt_blob_in_the_store_fails_the_load_and_is_never_laid_out(hosts: Hosts,
                                                                          installer: ModelInstallService,
                                                                          tmp_path: Path) -> None:
    source = make_lora_kohya(tmp_path / "rotten_lora.safetensors", rank=8)
    key, added = _install(hosts, installer, source)
    store = hosts.store()
    digest = added.files[0].blake3
    rotten = bytearray(source.read_bytes())
    rotten[len(rotten) // 2] ^= 0xFF
    hosts.s3.client().put_object(Bucket=store.bucket, Key=store.key(digest), Body=bytes(rotten))
    client = ModelBusClient(hosts.bus.config)
    with pytest.raises(JobFailedError, match=f"blob {digest} does not hash to its name"):
        client.load(key, timeout=TIMEOUT)
    assert not (hosts.cache_b / "blobs" / digest).exists()
    assert not (hosts.cache_b / "models" / key).exists()
