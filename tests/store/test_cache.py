"""The host cache: models laid out by hard links to verified blobs, LRU eviction of unpinned blobs,
refusal of corrupt bytes, and a clean failure when the model cannot fit."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from modelbus.events.schema import FileEntry
from modelbus.services.store import BlobCorruptError, BlobStore, CacheFullError, StoreConfigError, file_digest
from modelbus.services.store.cache import HostCache
from modelbus.services.store.s3 import S3BlobStore
from tests.servers.s3_server import S3Server

MiB = 1 << 20


def _model(store: BlobStore, folder: Path, sizes: dict[str, int], seed: bytes = b"") -> tuple[FileEntry, ...]:
    """Write files under ``folder``, put them in the store, and return their manifest."""
    entries = []
    for rel, size in sizes.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(seed + os.urandom(size - len(seed)))
        digest = file_digest(path)
        store.put(digest, path)
        entries.append(FileEntry(path=rel, size=size, blake3=digest))
    return tuple(entries)


def _corrupt_in_store(store: BlobStore, s3_server: S3Server, digest: str, data: bytes) -> None:
    if isinstance(store, S3BlobStore):
        s3_server.client().put_object(Bucket=store.bucket, Key=store.key(digest), Body=data)
    else:
        (store.blobs / digest).write_bytes(data)  # type: ignore[attr-defined]


def test_a_folder_model_is_laid_out_by_hard_links(blob_store: BlobStore, tmp_path: Path) -> None:
    files = _model(blob_store, tmp_path / "src" / "pipe", {"unet/model.safetensors": 3 * MiB,
                                                          "vae/model.safetensors": MiB, "model_index.json": 100})
    cache = HostCache(tmp_path / "cache", 100 * MiB, blob_store)
    path = cache.ensure("k1", "pipe", files)
    assert path == tmp_path / "cache" / "models" / "k1" / "pipe"
    for entry in files:
        laid = path / entry.path
        assert laid.read_bytes() == (tmp_path / "src" / "pipe" / entry.path).read_bytes()
        assert laid.stat().st_ino == (tmp_path / "cache" / "blobs" / entry.blake3).stat().st_ino
    assert cache.held() == ["k1"]
    assert cache.usage() == sum(f.size for f in files)


def test_a_single_file_model_and_a_shared_blob_stored_once(blob_store: BlobStore, tmp_path: Path) -> None:
    vae = _model(blob_store, tmp_path / "src", {"vae.safetensors": 2 * MiB})
    cache = HostCache(tmp_path / "cache", 100 * MiB, blob_store)
    single = cache.ensure("vae-key", "vae.safetensors", vae)
    assert single.is_file() and single.name == "vae.safetensors"
    # a pipeline that holds the same VAE file: its blob is not fetched again
    pipe = (FileEntry(path="vae/diffusion_pytorch_model.safetensors", size=vae[0].size, blake3=vae[0].blake3),)
    fetched: list[int] = []
    cache.ensure("pipe-key", "pipe", pipe, on_fetch=lambda blobs, total: fetched.append(total))
    assert fetched == []
    assert cache.usage() == 2 * MiB


def test_least_recently_used_unpinned_blobs_are_evicted(blob_store: BlobStore, tmp_path: Path) -> None:
    cache = HostCache(tmp_path / "cache", 5 * MiB, blob_store)
    a = _model(blob_store, tmp_path / "a", {"a.bin": 2 * MiB})
    b = _model(blob_store, tmp_path / "b", {"b.bin": 2 * MiB})
    c = _model(blob_store, tmp_path / "c", {"c.bin": 2 * MiB})
    cache.ensure("a", "a.bin", a)
    cache.ensure("b", "b.bin", b)
    os.utime(cache.blobs / b[0].blake3, (1, 1))  # b is the oldest use
    cache.pin({"b"})  # ...but loaded: it stays
    cache.ensure("c", "c.bin", c)
    assert sorted(cache.held()) == ["b", "c"]
    assert not (cache.models / "a").exists()
    assert cache.usage() <= 5 * MiB


def test_a_model_larger_than_the_cache_fails_before_fetching(blob_store: BlobStore, tmp_path: Path) -> None:
    cache = HostCache(tmp_path / "cache", 2 * MiB, blob_store)
    big = _model(blob_store, tmp_path / "big", {"big.bin": 3 * MiB})
    with pytest.raises(CacheFullError, match="holds at most"):
        cache.ensure("big", "big.bin", big)
    assert list(cache.blobs.iterdir()) == [] and cache.held() == []


def test_pinned_blobs_make_the_cache_too_small(blob_store: BlobStore, tmp_path: Path) -> None:
    cache = HostCache(tmp_path / "cache", 3 * MiB, blob_store)
    a = _model(blob_store, tmp_path / "a", {"a.bin": 2 * MiB})
    b = _model(blob_store, tmp_path / "b", {"b.bin": 2 * MiB})
    cache.ensure("a", "a.bin", a)
    cache.pin({"a"})
    with pytest.raises(CacheFullError, match="in use"):
        cache.ensure("b", "b.bin", b)
    assert cache.held() == ["a"]


def test_a_corrupt_cached_blob_is_fetched_again(blob_store: BlobStore, tmp_path: Path) -> None:
    files = _model(blob_store, tmp_path / "src", {"m.bin": MiB})
    HostCache(tmp_path / "cache", 10 * MiB, blob_store).ensure("m", "m.bin", files)
    blob = tmp_path / "cache" / "blobs" / files[0].blake3
    data = bytearray(blob.read_bytes())
    data[10] ^= 1
    blob.write_bytes(bytes(data))  # bit rot on this host's disk
    path = HostCache(tmp_path / "cache", 10 * MiB, blob_store).ensure("m", "m.bin", files)  # a new process
    assert path.read_bytes() == (tmp_path / "src" / "m.bin").read_bytes()


def test_a_corrupt_store_blob_is_refused_and_never_laid_out(blob_store: BlobStore, tmp_path: Path,
                                                            s3_server: S3Server) -> None:
    files = _model(blob_store, tmp_path / "src", {"m.bin": 2 * MiB})
    _corrupt_in_store(blob_store, s3_server, files[0].blake3, os.urandom(2 * MiB))
    cache = HostCache(tmp_path / "cache", 10 * MiB, blob_store)
    with pytest.raises(BlobCorruptError, match=files[0].blake3):
        cache.ensure("m", "m.bin", files)
    assert [p.name for p in cache.blobs.iterdir() if not p.name.endswith(".lock")] == []
    assert cache.held() == [] and not (cache.models / "m").exists()


def test_a_forged_manifest_is_refused(blob_store: BlobStore, tmp_path: Path) -> None:
    cache = HostCache(tmp_path / "cache", 10 * MiB, blob_store)
    for entry in (FileEntry(path="../escape", size=1, blake3="a" * 64), FileEntry(path="x", size=1, blake3="nope")):
        with pytest.raises(StoreConfigError):
            cache.ensure("m", "folder", (entry,))
    with pytest.raises(StoreConfigError, match="no manifest"):
        cache.ensure("m", "folder", ())


def test_a_full_disk_evicts_then_fails_cleanly(blob_store: BlobStore, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)], capture_output=True, check=False)
    if done.returncode:
        pytest.skip(f"mount refused: {done.stderr.decode().strip()}")
    try:
        cache = HostCache(disk / "cache", 100 * MiB, blob_store)  # the limit is not what stops it: the disk is
        old = _model(blob_store, tmp_path / "old", {"old.bin": 2 * MiB})
        new = _model(blob_store, tmp_path / "new", {"new.bin": 3 * MiB})
        huge = _model(blob_store, tmp_path / "huge", {"huge.bin": 7 * MiB})
        cache.ensure("old", "old.bin", old)
        (disk / "other.bin").write_bytes(b"\0" * (MiB + MiB // 2))  # someone else's file fills the disk
        path = cache.ensure("new", "new.bin", new)  # evicts `old` to fit
        assert path.read_bytes() == (tmp_path / "new" / "new.bin").read_bytes()
        assert cache.held() == ["new"]
        with pytest.raises(CacheFullError):
            cache.ensure("huge", "huge.bin", huge)
        assert not [p for p in cache.blobs.iterdir() if p.name.endswith((".partial", ".parts"))]
        assert not (cache.blobs / huge[0].blake3).exists()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_routing_prefers_vram_then_disk_then_free_vram() -> None:
    from modelbus.events.workers import CachedModel, WorkerState
    from modelbus.services.routing import choose_gpu_worker

    def state(worker_id: str, vram_free: int, disk: tuple[str, ...] = (), models: tuple[str, ...] = ()) -> WorkerState:
        return WorkerState(id=worker_id, host="h", pid=1, queues=("gpu",), time=0.0, vram_free=vram_free,
                           disk_models=disk, models=tuple(CachedModel(key=m, model_key=m) for m in models))

    states = [state("roomy", 80), state("disk", 10, disk=("k",)), state("vram", 0, disk=("k",), models=("k",))]
    assert choose_gpu_worker(states, "k") == "vram"
    assert choose_gpu_worker(states[:2], "k") == "disk"
    assert choose_gpu_worker(states[:2], "other") == "roomy"
    assert choose_gpu_worker([state("old", 5)], "k") == "old"


def test_two_hosts_fetching_one_blob_at_once_both_get_it_whole(blob_store: BlobStore, tmp_path: Path) -> None:
    import threading
    files = _model(blob_store, tmp_path / "src", {"shared.bin": 12 * MiB})
    caches = [HostCache(tmp_path / f"host-{i}" / "cache", 100 * MiB, blob_store) for i in range(2)]
    paths: dict[int, Path] = {}
    errors: list[BaseException] = []

    def load(i: int) -> None:
        try:
            paths[i] = caches[i].ensure("m", "shared.bin", files)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    source = (tmp_path / "src" / "shared.bin").read_bytes()
    assert paths[0].read_bytes() == source == paths[1].read_bytes()
    assert paths[0].stat().st_ino != paths[1].stat().st_ino  # each host its own copy


def test_a_store_that_is_down_fails_the_fetch_naming_it_and_lays_out_nothing(tmp_path: Path,
                                                                             aws_env: dict[str, str]) -> None:
    from modelbus.services.store import BlobStoreUnavailableError, parse_store_url
    from tests.servers.s3_server import free_port
    endpoint = f"http://127.0.0.1:{free_port()}"
    store = S3BlobStore(parse_store_url("s3://gone-bucket/fleet"), endpoint_url=endpoint, retries=1)
    cache = HostCache(tmp_path / "cache", 10 * MiB, store)
    entry = FileEntry(path="m.bin", size=MiB, blake3="b" * 64)
    with pytest.raises(BlobStoreUnavailableError, match=f"s3://gone-bucket/fleet at {endpoint}: reading blob"):
        cache.ensure("m", "m.bin", (entry,))
    assert cache.held() == [] and not (cache.blobs / entry.blake3).exists()
