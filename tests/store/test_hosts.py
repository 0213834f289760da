"""Two hosts without a shared directory: each its own MODELBUS_ROOT and cache, one S3 store. A model
installed by host A's install worker is loaded by host B's GPU worker, which fetches it first."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from modelbus.events.schema import ModelFetchCompleted, ModelFetchStarted
from modelbus.services import routing
from modelbus.services.client import ModelBusClient
from modelbus.services.client.errors import JobFailedError
from modelbus.services.install import ModelInstallService
from tests.fixtures.model_files import make_lora_kohya
from tests.install.conftest import make_service
from tests.servers.s3_server import S3Server
from tests.store.hosts import Hosts, install, two_hosts
from tests.waiting import wait_until

TIMEOUT = 120


@pytest.fixture(scope="module")
def hosts(redis_url: str, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    for hosts in two_hosts(redis_url, s3_server, tmp_path_factory.mktemp("hosts"), "two-hosts"):
        hosts.start_gpu("gpu-b")
        yield hosts


@pytest.fixture()
def installer(hosts: Hosts) -> Iterator[ModelInstallService]:
    service = make_service(hosts.bus)
    yield service
    service.record_store.close()


def test_a_model_installed_on_one_host_is_loaded_on_another(hosts: Hosts, installer: ModelInstallService,
                                                             tmp_path: Path) -> None:
    source = make_lora_kohya(tmp_path / "travelling_lora.safetensors", rank=16)
    key, added = install(hosts, installer, source)
    assert not (hosts.root_b / "models").exists() or not list((hosts.root_b / "models").rglob("*.safetensors"))
    client = ModelBusClient(hosts.bus.config)
    placed = client.load(key, timeout=TIMEOUT)
    assert placed["worker"] == "gpu-b"
    laid = hosts.cache_b / "models" / key / "travelling_lora.safetensors"
    assert laid.read_bytes() == source.read_bytes()
    assert laid.stat().st_ino == (hosts.cache_b / "blobs" / added.files[0].blake3).stat().st_ino
    fetches = [d.event for d in client.events(types=["model_fetch_started", "model_fetch_completed"])
               if d.event.payload["model_key"] == key]  # type: ignore[attr-defined]
    assert [type(e) for e in fetches] == [ModelFetchStarted, ModelFetchCompleted]
    kinds = [e.payload for e in fetches]  # type: ignore[attr-defined]
    assert kinds[1]["bytes"] == source.stat().st_size
    # the heartbeat says what host B holds on disk: routing's disk affinity
    wait_until(lambda: any(key in w.disk_models for w in client.workers()), 30,
               "gpu-b's heartbeat to list the model on disk")
    states = routing.worker_states(client.redis, hosts.bus.config.namespace)
    assert routing.choose_gpu_worker([s.model_copy(update={"models": ()}) for s in states], key) == "gpu-b"


def test_a_corrupt_blob_in_the_store_fails_the_load_and_is_never_laid_out(hosts: Hosts,
                                                                          installer: ModelInstallService,
                                                                          tmp_path: Path) -> None:
    source = make_lora_kohya(tmp_path / "rotten_lora.safetensors", rank=8)
    key, added = install(hosts, installer, source)
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


def test_modelbus_load_shows_the_fetch(hosts: Hosts, installer: ModelInstallService, tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from modelbus.services.cli.progress import LoadStatus
    source = make_lora_kohya(tmp_path / "shown_lora.safetensors", rank=12)
    key, _ = install(hosts, installer, source)
    client = ModelBusClient(hosts.bus.config)
    status = LoadStatus(client, key, Console(file=io.StringIO()))
    status.run(lambda: client.load(key, timeout=TIMEOUT))
    assert "model_fetch_started" in status.seen and "model_fetch_completed" in status.seen
    assert status.seen.index("model_fetch_completed") < status.seen.index("model_load_completed")
