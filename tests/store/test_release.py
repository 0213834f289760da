"""Deleting a model removes its blobs from the store when no other record names them
(services.store.release), against the moto S3 server and a real Redis:

- two models sharing a blob: deleting one keeps the shared blob (and removes its own), deleting both
  removes it;
- a delete racing an install of the same content: an install holding its claim (between its upload and
  its record) keeps the blob; an install that starts while a delete is deciding waits for it and uploads
  the blob again; installs and deletes run at once in threads never leave a record naming a missing blob;
- a host cache forgets a deleted model (its layout, and the blobs only it linked) on its next load.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelbus.events.keys import Keys
from modelbus.events.schema import FileEntry
from modelbus.services.client import ModelBusClient
from modelbus.services.config import AppConfig
from modelbus.services.install import ModelInstallService
from modelbus.services.install.manifest import recorded_manifest
from modelbus.services.store import parse_store_url
from modelbus.services.store.cache import HostCache
from modelbus.services.store.release import BlobClaims
from modelbus.services.store.s3 import S3BlobStore
from tests.fixtures.model_files import make_lora_diffusers
from tests.servers.s3_server import S3Server
from tests.waiting import wait_until


class Fleet:
    def __init__(self, config: AppConfig, s3_server: S3Server) -> None:
        self.config = config
        self.service = ModelInstallService(config)
        self.client = ModelBusClient(config)
        self.store = S3BlobStore(parse_store_url(config.store_url), endpoint_url=s3_server.url)
        self.claims = BlobClaims(self.service.event_store.client, Keys(config.namespace))
        self.weights = make_lora_diffusers(config.root / "weights", base="sdxl", folder=True)

    def model(self, label: str) -> Path:
        """A folder model: the shared LoRA weights and a note of its own (so a key and a blob of its own)."""
        folder = self.config.models_path / "sdxl" / "lora" / label
        folder.mkdir(parents=True)
        (folder / "pytorch_lora_weights.safetensors").write_bytes(
            (self.weights / "pytorch_lora_weights.safetensors").read_bytes())
        (folder / "note.txt").write_text(f"model {label} {uuid.uuid4().hex}")
        return folder

    def register(self, label: str) -> str:
        """Record a model in place (a second copy of the weights is a model of its own: force)."""
        return self.service.register_path(self.model(label), force=True)

    def files(self, key: str) -> tuple[FileEntry, ...]:
        return recorded_manifest(self.service.record_store.history(key))

    def stored(self) -> set[str]:
        return {b.digest for b in self.store.digests()}

    def close(self) -> None:
        self.service.record_store.close()
        self.client.close()


@pytest.fixture()
def fleet(redis_url: str, namespace: str, s3_url: str, s3_server: S3Server, tmp_path: Path) -> Iterator[Fleet]:
    config = AppConfig.load(root=tmp_path / "root", redis_url=redis_url, namespace=namespace, store_url=s3_url,
                            s3_endpoint_url=s3_server.url, hash_threads=1)
    fleet = Fleet(config, s3_server)
    yield fleet
    fleet.close()


def _shared(fleet: Fleet, a: str, b: str) -> str:
    common = {f.blake3 for f in fleet.files(a)} & {f.blake3 for f in fleet.files(b)}
    assert len(common) == 1
    return common.pop()


def test_a_blob_two_models_share_goes_with_the_second_delete(fleet: Fleet) -> None:
    a = fleet.register("a")
    b = fleet.register("b")
    shared = _shared(fleet, a, b)
    own_a = {f.blake3 for f in fleet.files(a)} - {shared}
    own_b = {f.blake3 for f in fleet.files(b)} - {shared}
    assert fleet.stored() == {shared} | own_a | own_b

    fleet.client.delete_model(a)
    after_one = fleet.stored()
    fleet.client.delete_model(b)
    after_both = fleet.stored()
    print(f"\n[shared blob] 3 blobs stored; after deleting one model: {len(after_one)} "
          f"(shared kept, its own removed); after deleting both: {len(after_both)}")
    assert after_one == {shared} | own_b
    assert after_both == set()


def test_an_install_holding_its_claim_keeps_the_blob_a_delete_would_remove(fleet: Fleet) -> None:
    a = fleet.register("claimed")
    digests = {f.blake3 for f in fleet.files(a)}
    with fleet.claims.held(digests):  # an install of the same content between its upload and its record
        fleet.client.delete_model(a)
        kept = fleet.stored()
    assert kept == digests, "a blob an install had claimed was removed"
    report = fleet.claims.release(fleet.store, digests, lambda: set())  # the claim is gone: now it may go
    assert sorted(report.removed) == sorted(digests) and fleet.stored() == set()


def test_an_install_during_a_delete_waits_and_uploads_the_blob_again(fleet: Fleet) -> None:
    a = fleet.register("first")
    digests = {f.blake3 for f in fleet.files(a)}
    second = fleet.model("second")
    deciding, go_on = threading.Event(), threading.Event()
    installed: list[str] = []
    installer = threading.Thread(target=lambda: installed.append(fleet.service.register_path(second, force=True)))

    def referenced() -> set[str]:  # the delete, marks held, about to read the log
        deciding.set()
        installer.start()
        assert go_on.wait(60)
        return set()

    fleet.service.record_store.del_model(a)
    releaser = threading.Thread(target=lambda: fleet.claims.release(fleet.store, digests, referenced))
    releaser.start()
    assert deciding.wait(60)
    wait_until(lambda: installer.is_alive(), 10, "the install to start")
    blocked = installer.is_alive() and not installed  # (it waits on the marks: nothing to assert by time)
    go_on.set()
    releaser.join(60)
    installer.join(120)
    assert installed, "the install did not finish"
    files = fleet.files(installed[0])
    print(f"\n[install during delete] the install waited on the delete's marks ({blocked}); after the delete "
          f"removed {len(digests)} blob(s), the install uploaded them again: missing now "
          f"{fleet.store.missing((f.blake3, f.size) for f in files)}")
    assert fleet.store.missing((f.blake3, f.size) for f in files) == []


def _race(fleet: Fleet, old: str, new: Path) -> str:
    """Install ``new`` and delete ``old`` (the same weights) at once, each in a client of its own."""
    barrier = threading.Barrier(2)
    keys: list[str] = []

    def install() -> None:
        service = ModelInstallService(fleet.config)
        try:
            barrier.wait()
            keys.append(service.register_path(new, force=True))
        finally:
            service.record_store.close()

    def delete() -> None:
        with ModelBusClient(fleet.config) as client:
            barrier.wait()
            client.delete_model(old)

    threads = [threading.Thread(target=install), threading.Thread(target=delete)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert keys, "the install did not finish"
    return keys[0]


def test_installs_and_deletes_of_the_same_content_at_once_never_lose_a_recorded_blob(fleet: Fleet) -> None:
    for round_ in range(4):
        key = _race(fleet, fleet.register(f"old-{round_}"), fleet.model(f"new-{round_}"))
        for model in fleet.service.record_store.all_models():
            files = fleet.files(model.key)
            assert fleet.store.missing((f.blake3, f.size) for f in files) == [], \
                f"round {round_}: record {model.key} names a blob the store lost"
        fleet.client.delete_model(key)
    assert fleet.stored() == set()


def test_a_host_cache_forgets_a_deleted_model_on_its_next_load(fleet: Fleet, tmp_path: Path) -> None:
    a = fleet.register("cached-a")
    b = fleet.register("cached-b")
    cache = HostCache(tmp_path / "cache", 1 << 30, fleet.store)
    for key in (a, b):
        cache.ensure(key, key, fleet.files(key))
    shared = _shared(fleet, a, b)
    own_a = ({f.blake3 for f in fleet.files(a)} - {shared}).pop()
    fleet.client.delete_model(a)
    records = fleet.service.record_store
    forgotten = cache.forget_removed(records.exists)
    blobs = {p.name for p in cache.blobs.iterdir() if not p.name.startswith(".")}
    assert forgotten == [a] and cache.held() == [b]
    assert shared in blobs and own_a not in blobs
    assert cache.forget_removed(records.exists) == []
