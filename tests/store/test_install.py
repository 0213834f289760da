"""Installs with ``MODELBUS_STORE_URL=s3://...``: real install workers upload the blobs the store lacks,
verify them, and only then append ModelAdded, whose manifest names every blob."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from modelbus.events.schema import ModelAdded
from modelbus.services.install import InstallStatus, ModelInstallService
from modelbus.services.store import parse_store_url
from modelbus.services.store.s3 import S3BlobStore
from tests.fixtures.model_files import make_lora_kohya, make_vae_checkpoint
from tests.install.conftest import Bus, _bus, make_service
from tests.servers.s3_server import CREDENTIALS, S3Server, free_port

TIMEOUT = 120


@pytest.fixture(scope="module")
def store_bus(redis_url: str, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    s3_server.client().create_bucket(Bucket="install-fleet")
    env = {"MODELBUS_STORE_URL": "s3://install-fleet/models", "MODELBUS_S3_ENDPOINT_URL": s3_server.url,
           "MODELBUS_STORE_RETRIES": "2", **CREDENTIALS}
    yield from _bus(redis_url, tmp_path_factory.mktemp("store-bus"), start_workers=1, extra_env=env)


@pytest.fixture()
def installer(store_bus: Bus) -> Iterator[ModelInstallService]:
    service = make_service(store_bus)
    yield service
    service.record_store.close()


def _store(bus: Bus) -> S3BlobStore:
    config = bus.config
    return S3BlobStore(parse_store_url(config.store_url), endpoint_url=config.s3_endpoint_url)


def _added(installer: ModelInstallService, key: str) -> ModelAdded:
    events = [s.event for s in installer.record_store.history(key) if isinstance(s.event, ModelAdded)]
    assert len(events) == 1
    return events[0]


def test_an_install_uploads_every_blob_before_it_records_the_model(store_bus: Bus, installer: ModelInstallService,
                                                                    tmp_path: Path) -> None:
    source = make_lora_kohya(tmp_path / "store_lora.safetensors", rank=4)
    done = installer.wait_for_job(installer.heuristic_import(str(source)), timeout=TIMEOUT)
    assert done.status is InstallStatus.COMPLETED, (done.error, store_bus.worker_log())
    added = _added(installer, done.key)
    assert [(f.path, f.size) for f in added.files] == [("store_lora.safetensors", source.stat().st_size)]
    store = _store(store_bus)
    assert store.missing((f.blake3, f.size) for f in added.files) == []
    fetched = tmp_path / "fetched"
    store.fetch(added.files[0].blake3, added.files[0].size, fetched)
    assert fetched.read_bytes() == source.read_bytes()


def test_a_store_that_is_down_fails_the_install_and_records_nothing(redis_url: str, s3_server: S3Server,
                                                                    tmp_path_factory: pytest.TempPathFactory,
                                                                    tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    env = {"MODELBUS_STORE_URL": "s3://install-fleet/models", "MODELBUS_S3_ENDPOINT_URL": down,
           "MODELBUS_STORE_RETRIES": "1", **CREDENTIALS}
    for bus in _bus(redis_url, tmp_path_factory.mktemp("down-bus"), start_workers=1, extra_env=env):
        service = make_service(bus)
        try:
            source = make_vae_checkpoint(tmp_path / "down_vae.safetensors")
            done = service.wait_for_job(service.heuristic_import(str(source)), timeout=TIMEOUT)
            assert done.status is InstallStatus.ERROR, bus.worker_log()
            assert done.error is not None and f"s3://install-fleet/models at {down}" in done.error
            assert done.error_type == "BlobStoreUnavailableError"
            assert service.record_store.all_models() == []
            assert not [p for p in bus.config.models_path.rglob("*") if p.is_file()]
        finally:
            service.record_store.close()
