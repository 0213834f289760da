"""A GPU worker killed (SIGKILL) half-way through fetching a model from the store: nothing corrupt is
laid out, and the next worker on that host resumes the blob from the parts already there and loads it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from modelbus.services.client import ModelBusClient
from modelbus.services.install import ModelInstallService
from tests.fixtures.model_files import lora_kohya_shapes, make_sparse_safetensors
from tests.install.conftest import make_service
from tests.servers.s3_server import S3Server
from tests.store.conftest import s3_server  # noqa: F401 - the S3 endpoint fixture
from tests.store.hosts import Hosts, install, two_hosts
from tests.waiting import wait_until

SIZE = 64 << 20  # eight 8 MiB parts: the kill lands between the first part and the last


@pytest.fixture()
def hosts(redis_url: str, s3_server: S3Server, tmp_path: Path) -> Iterator[Hosts]:  # noqa: F811
    yield from two_hosts(redis_url, s3_server, tmp_path / "hosts", "fetch-kill")


@pytest.fixture()
def installer(hosts: Hosts) -> Iterator[ModelInstallService]:
    service = make_service(hosts.bus)
    yield service
    service.record_store.close()


def test_a_fetch_killed_mid_blob_resumes_on_the_next_worker(hosts: Hosts, installer: ModelInstallService,
                                                            tmp_path: Path) -> None:
    source = make_sparse_safetensors(tmp_path / "heavy_lora.safetensors", SIZE, shapes=lora_kohya_shapes("sd-1", 4),
                                     pad_name="lora_unet_zz_padding.alpha")
    key, added = install(hosts, installer, source)
    digest = added.files[0].blake3
    hosts.start_gpu("gpu-victim")
    client = ModelBusClient(hosts.bus.config)
    client.load(key, wait=False)
    parts = hosts.cache_b / "blobs" / f".{digest}.parts"
    wait_until(lambda: parts.exists() and parts.read_text().strip(), 120, "the victim to fetch a first part",
               details=hosts.bus.worker_log, interval=0.01)
    hosts.kill_gpu("gpu-victim")
    assert not (hosts.cache_b / "blobs" / digest).exists(), "the kill came too late: the blob was whole"
    assert not (hosts.cache_b / "models" / key).exists()

    hosts.start_gpu("gpu-rescuer")
    placed = client.load(key, timeout=180)
    assert placed["worker"] == "gpu-rescuer"
    laid = hosts.cache_b / "models" / key / "heavy_lora.safetensors"
    assert laid.stat().st_size == SIZE
    assert laid.stat().st_ino == (hosts.cache_b / "blobs" / digest).stat().st_ino
    assert "blob_fetch_resumed" in (hosts.bus.logs / "gpu-rescuer.log").read_text()
    assert not list((hosts.cache_b / "blobs").glob(".*.partial"))
